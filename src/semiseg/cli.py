"""`semiseg` command line: methods, train, evaluate, predict, demo, report and data (prepare, download, convert).

User errors (`SemisegError`) print one line and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import SemisegError

# -h everywhere (inherited by every sub-command's context), besides --help.
CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT,
                  help="Semi-supervised medical image segmentation (CAML, MLRPL, CrossMatch and baselines).")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"semiseg {__version__}")
        raise typer.Exit()


# `--version` on the root and on every command, as `-h` is.
Version = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                       help="Print semiseg's version and exit")]


@app.callback()
def _root(version: Version = False) -> None:
    """Semi-supervised medical image segmentation (CAML, MLRPL, CrossMatch and baselines)."""


@app.command()
def methods(version: Version = False) -> None:
    """List the registered methods, their networks' parameter counts and presets."""
    from .methods import available_methods
    from .methods.base import NetSpec
    from .nets import count_parameters, evaluated_parameters

    for name, cls in available_methods().items():
        method = cls(cls.Params(), NetSpec())
        params = evaluated_parameters(method.inference_network())
        total = count_parameters(method)
        presets = ", ".join(cls.presets) or "-"
        typer.echo(f"{name:12s} {total:>12,d} params (evaluated net {params:,d})  {cls.description}")
        typer.echo(f"{'':12s} presets: {presets}")


@app.command(epilog="Every key of --set and --config, with its type, default and meaning: "
             "`semiseg config keys --method NAME`.")
def train(
    method: Annotated[str | None, typer.Option(help="Method name, required for a new run (`semiseg methods`)")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset folder, or synthetic[:n_train=..,shape=WxHxD]",
                                             show_default="synthetic")] = None,
    labeled: Annotated[int | None, typer.Option(help="Number of labelled training cases (the first N)",
                                                show_default="8, the LA benchmark's")] = None,
    val: Annotated[int | None, typer.Option(help="Validation cases for checkpoint selection (the dataset's "
                                            "declared list, else the last V labelled ones)",
                                            show_default="0")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations; with --resume, a larger value "
                                                   "extends the run", show_default="the method's recipe")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights, batches and augmentation",
                                             show_default="1337")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N",
                                               show_default="auto")] = None,
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/run"),
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    preset: Annotated[str | None, typer.Option(help="Named preset of the method, e.g. la-8")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override (repeatable); keys: "
                                                   "`semiseg config keys`")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output")] = False,
    version: Version = False,
) -> None:
    """Train a method; writes config, logs, TensorBoard scalars and checkpoints into --out.

    With --resume only the options typed are compared with the saved run. Ctrl-C writes a checkpoint at the
    current iteration and exits with status 130.
    """
    from .config import build_config, load_yaml, parse_set
    from .engine.trainer import Trainer, TrainingInterrupted

    typed = parse_set(set_ or [])
    for key, value in (("data", data), ("labeled", labeled), ("val", val), ("iterations", iterations),
                       ("seed", seed), ("device", device)):
        if value is not None:
            typed[key] = value
    try:
        if resume:
            trainer = Trainer(None, out, resume=True, progress=not quiet,
                              resume_changes=_typed_for_resume(typed, method, config, preset))
        else:
            if method is None and (config is None or "method" not in load_yaml(config)):
                from .methods import available_methods

                raise SemisegError("train needs --method NAME; methods: " + ", ".join(available_methods()) +
                                   " (`semiseg methods` describes them)")
            trainer = Trainer(build_config(method, config, typed, preset), out, progress=not quiet)
        complete = trainer.start >= trainer.cfg.iterations
        checkpoint = trainer.run()
    except TrainingInterrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    if complete:
        typer.echo(f"nothing to train: {out} is complete at iteration {trainer.start} of {trainer.cfg.iterations} "
                   "(a larger --iterations with --resume extends it)")
    for line in _finish_lines(out, checkpoint):
        typer.echo(line)


def _typed_for_resume(typed: dict, method: str | None, config: Path | None, preset: str | None) -> dict:
    """What the user typed, as config keys: the options, the --set keys and the keys of a --config file."""
    from .config import load_yaml

    keys = {}
    if config is not None:
        values = load_yaml(config)
        keys.update({f"params.{k}": v for k, v in (values.pop("params", None) or {}).items()})
        keys.update(values)
    keys.update(typed)
    keys.update({k: v for k, v in (("method", method), ("preset", preset)) if v is not None})
    return keys


def _finish_lines(out: Path, checkpoint: Path) -> list[str]:
    """The end of a run in three lines: the last and best results, the checkpoint, the next command."""
    summary_file = out / "train_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    last, best = summary.get("last") or {}, summary.get("best_val") or {}
    lines = []
    if last.get("loss") is not None:
        lines.append(f"done     iteration {last['iteration']}, last loss {last['loss']:.4f}, "
                     f"{summary.get('total_wall_s', 0) / 60:.2f} min of training")
    if best.get("iteration"):
        val = last.get("val_dice") or {}
        lines.append(f"val Dice best {best['dice']:.4f} at iteration {best['iteration']} ({out / 'best.pt'}), last "
                     f"{val.get('dice', float('nan')):.4f} at {val.get('iteration', '-')}")
    lines.append(f"checkpoint: {checkpoint}")
    lines.append(f"next: semiseg evaluate {out}")
    return lines


def _default_eval_out(source: Path, split: str) -> Path:
    """`RUN/eval-SPLIT` for a semiseg run folder or a file in one (its evaluations are the tool's own output);
    anything else is the user's, and nothing is written beside it unasked."""
    folder = source if source.is_dir() else source.parent
    written_by_train = (folder / "config.yaml").is_file() and (folder / "split.json").is_file()
    if written_by_train or not source.exists():  # a missing source is reported before anything is written
        return folder / f"eval-{split}"
    raise SemisegError(f"{source}: not in a semiseg run folder, so the evaluation is not written beside it; give "
                       "--out DIR")


@app.command()
def evaluate(
    run: Annotated[Path | None, typer.Argument(help="Run folder, model.pt or checkpoint file")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset (default: the one the run was trained on; a moved "
                                             "one is recognised by its fingerprint)")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/eval-SPLIT for a run folder; "
                                                  "needed for anything else)")] = None,
    pred: Annotated[Path | None, typer.Option(help="Score label maps in this folder instead of a model")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto (the run's rule), last or best")] = "auto",
    lcc: Annotated[bool | None, typer.Option(help="Keep the largest connected component")] = None,
    empty_policy: Annotated[str | None, typer.Option(help="legacy_zero, nan or penalty")] = None,
    save_predictions: Annotated[bool, typer.Option(help="Also write the label maps, in the dataset's own format "
                                                   "and geometry")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    spacing: Annotated[str | None, typer.Option(
        help="X,Y,Z mm per voxel for HD95 / ASD (default: the dataset's own spacing when its files record it, "
             "as NIfTI / NRRD data do; voxels for the benchmark h5 data, as the papers)")] = None,
    official_checkpoint: Annotated[Path | None, typer.Option(
        help="A .pth saved by the method's official training script (needs --method and --data)")] = None,
    method: Annotated[str | None, typer.Option(help="With --official-checkpoint: the method")] = None,
    preset: Annotated[str | None, typer.Option(help="With --official-checkpoint: the method's preset")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="With --official-checkpoint: key=value, "
                                                   "e.g. n_filters=16 or patch_size=112,112,80")] = None,
    cpu_bf16: Annotated[bool | None, typer.Option(
        help="bf16 autocast on CPU (faster on AVX512-BF16/AMX; rounding-level changes, stated on the card)")] = None,
    fold_bn: Annotated[bool | None, typer.Option(
        help="Fold BatchNorm into the convolutions (faster; rounding-level changes, stated on the card)")] = None,
    voxels: Annotated[bool, typer.Option(help="HD95 / ASD in voxels even when the dataset knows its "
                                         "spacing")] = False,
    quiet: Annotated[bool, typer.Option(help="No per-case progress")] = False,
    version: Version = False,
) -> None:
    """Score a model (or a folder of predictions) with the papers' metrics and a protocol card."""
    from .engine.evaluate import (
        check_options,
        evaluate_checkpoint,
        evaluate_predictions,
        format_card,
        format_summary,
        parse_spacing,
    )

    check_options(checkpoint, empty_policy)
    voxel_size = parse_spacing(spacing)
    if voxels and voxel_size is not None:
        raise SemisegError("--voxels and --spacing contradict each other; give one of them")
    units = "voxels" if voxels else voxel_size
    if official_checkpoint is not None:
        from .config import build_config, parse_set
        from .engine.evaluate import evaluate_official_checkpoint

        if method is None or data is None:
            raise SemisegError("--official-checkpoint needs --method NAME and --data DATASET")
        cfg = build_config(method, None, {**parse_set(set_ or []), "data": data}, preset)
        target = out or _default_eval_out(official_checkpoint, split)
        summary = evaluate_official_checkpoint(official_checkpoint, cfg, target, split, lcc, empty_policy, device,
                                               save_predictions, units)
    elif pred is not None:
        if data is None:
            raise SemisegError("--pred needs --data, the dataset whose labels are the reference")
        target = out or _default_eval_out(pred, split)
        summary = evaluate_predictions(pred, data, target, split, empty_policy or "legacy_zero", units,
                                       progress=not quiet)
    else:
        if run is None:
            raise SemisegError("give a run folder or checkpoint, or --pred DIR with --data")
        target = out or _default_eval_out(run, split)
        summary = evaluate_checkpoint(run, target, data, split, checkpoint, lcc, empty_policy, device,
                                      save_predictions, units, progress=not quiet, cpu_bf16=cpu_bf16,
                                      fold_bn=fold_bn)
    for line in [*format_summary(summary), *format_card(summary)]:
        typer.echo(line)
    typer.echo(f"protocol card and per-case metrics: {target / 'summary.json'}, {target / 'cases.csv'}")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder, model.pt or checkpoint file")],
    inputs: Annotated[list[Path], typer.Argument(help="Images (.h5, .nii, .nii.gz, .nrrd; multi-channel as "
                                                  "CASE_0000, CASE_0001, ...) or folders of them")],
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("predictions"),
    normalize: Annotated[str, typer.Option(help="auto (the prepared dataset's recipe, else z-score NIfTI), "
                                           "zscore or none")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    data: Annotated[str | None, typer.Option(help="Training dataset, if moved since training (for its "
                                             "preprocessing)")] = None,
    quiet: Annotated[bool, typer.Option(help="No per-case progress")] = False,
    version: Version = False,
) -> None:
    """Write label maps for new images (NIfTI / NRRD on the input's grid, with its affine and header)."""
    from .engine.predict import predict_files

    for path in predict_files(checkpoint, inputs, out, device, normalize, data, progress=not quiet):
        typer.echo(str(path))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder or checkpoint file")],
    out: Annotated[Path | None, typer.Option(help="Model file to write (default RUN/model.pt)")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto (the run's rule), last or best")] = "auto",
) -> None:
    """Write the inference network alone: weights, network spec, preprocessing, inference protocol and card.

    `evaluate` and `predict` take the file in place of the run folder; it loads without the method's code.
    """
    from .engine.evaluate import resolve_checkpoint
    from .engine.model_file import MODEL, export_model

    source, rule = resolve_checkpoint(run, checkpoint)
    path = export_model(source, out or (run if run.is_dir() else run.parent) / MODEL, rule)
    typer.echo(f"model: {path} ({path.stat().st_size / 2**20:.1f} MiB; exported from {source}, "
               f"{source.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/demo"),
    method: Annotated[str, typer.Option(help="Method to train")] = "mlrpl",
    iterations: Annotated[int, typer.Option(help="Training iterations")] = 200,
    version: Version = False,
) -> None:
    """Train and evaluate on the embedded synthetic dataset (no download), a few minutes on a CPU.

    The method's recipe runs at a small size: 4 labelled + 16 unlabelled synthetic cases of 96x96x64, patch
    64x64x32, 8 base filters, and every iteration-based schedule shrunk to the iteration budget. Progress is
    printed from the first iterations; the metrics are followed by a digest of the protocol card.
    """
    from .config import build_config, scaled_schedules
    from .engine.evaluate import evaluate_checkpoint, format_card, format_summary
    from .engine.trainer import Trainer

    typer.echo(f"semiseg demo: {method}, {iterations} iterations on synthetic data (generated on first use), "
               f"then evaluation on its 4 test cases; run folder {out}", err=True)
    overrides = {"data": "synthetic:n_train=20,n_test=4,shape=96x96x64", "labeled": 4, "iterations": iterations,
                 "patch_size": (64, 64, 32), "stride": (16, 16, 8), "n_filters": 8, "checkpoint_every": 50,
                 "log_every": 10, **scaled_schedules(method, iterations)}
    cfg = build_config(method, None, overrides)
    resume = (out / "checkpoint.pt").exists()
    Trainer(cfg, out, resume=resume).run()
    summary = evaluate_checkpoint(out, out / "eval-test")
    unlabeled = summary["protocol"]["dataset"]["n_unlabeled"]
    typer.echo(f"{method} on synthetic data, {cfg.labeled} labelled + {unlabeled} unlabelled cases, "
               f"{iterations} iterations, {len(summary['cases'])} test cases:")
    for line in [*format_summary(summary), *format_card(summary)]:
        typer.echo(line)
    typer.echo(json.dumps({"summary": str(out / "eval-test" / "summary.json")}))


config_app = typer.Typer(no_args_is_help=True, help="The configuration keys of `train --set` and `--config`.")
app.add_typer(config_app, name="config")


@config_app.callback()
def _config_group(version: Version = False) -> None:
    """The configuration keys of `train --set` and `--config`."""


@config_app.command("keys")
def config_keys(
    method: Annotated[str | None, typer.Option(help="Also the method's own parameters, and the common "
                                               "defaults with its recipe")] = None,
    version: Version = False,
) -> None:
    """Every key with its type, default and one line of help (generated from the configuration models)."""
    from .config import config_keys as describe

    for title, rows in describe(method):
        typer.echo(f"{title}:")
        width = max(len(r[0]) for r in rows) + 2
        kind = min(max(len(r[1]) for r in rows) + 2, 28)
        for key, type_name, default, text in rows:
            first = " ".join(text.split()).split(". ")[0].rstrip(".")
            typer.echo(f"  {key:<{width}}{type_name:<{kind}} {default:<14} {first}")
    if method is None:
        typer.echo("method parameters: `semiseg config keys --method NAME` (`semiseg methods` lists the names)")


data_app = typer.Typer(no_args_is_help=True, help="Your own data: check and prepare it; convert or download "
                       "public datasets.")
app.add_typer(data_app, name="data")


@data_app.callback()
def _data_group(version: Version = False) -> None:
    """Your own data: check and prepare it; convert or download public datasets."""


@data_app.command("prepare")
def data_prepare(
    folder: Annotated[Path, typer.Argument(help="nnU-Net-style folder: dataset.json, imagesTr/, labelsTr/, ...")],
    out: Annotated[Path | None, typer.Option(help="Cache folder (default FOLDER/semiseg-prepared)")] = None,
    spacing: Annotated[str | None, typer.Option(help="Resample to X,Y,Z mm, or 'median' (default: native)")] = None,
    ct_window: Annotated[str | None, typer.Option(help="CT window LO,HI in HU (default: 0.5-99.5 % of the "
                                                  "labelled foreground)")] = None,
    check: Annotated[bool, typer.Option(help="Only check the files, write nothing")] = False,
    version: Version = False,
) -> None:
    """Check every file (prints each problem with its file name), then write the training cache."""
    from .data.prepare import prepare

    window = None
    if ct_window:
        values = [float(v) for v in ct_window.split(",")]
        if len(values) != 2 or values[0] >= values[1]:
            raise SemisegError(f"--ct-window {ct_window!r}: give LO,HI with LO < HI, e.g. -125,275")
        window = (values[0], values[1])
    cache = prepare(folder, out, spacing, window, check_only=check)
    if cache is None:
        typer.echo(f"{folder}: no problems found")
        return
    manifest = json.loads((cache / "prepared.json").read_text())
    typer.echo(f"prepared {len(manifest['labeled'])} labelled, {len(manifest['unlabeled'])} unlabelled and "
               f"{len(manifest['test'])} labelled test cases: {cache}")
    from .data import open_dataset

    patch, stride, why = open_dataset(str(cache)).default_window()
    typer.echo(f"window for training: patch {'x'.join(map(str, patch))}, stride {'x'.join(map(str, stride))} "
               f"({why}; --set patch_size=... to change)")
    typer.echo(f"train with: semiseg train --method mean_teacher --data {folder if out is None else cache} "
               f"--labeled {len(manifest['labeled'])} --out runs/{Path(folder).resolve().name} (or any method "
               "of `semiseg methods`)")


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="la (the preprocessed LA-2018 files of the UA-MT protocol)")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create")] = Path("data/LA"),
    base_url: Annotated[str | None, typer.Option(help="Where the case folders are served")] = None,
    workers: Annotated[int, typer.Option(help="Parallel downloads")] = 4,
    version: Version = False,
) -> None:
    """Fetch, verify (SHA-256) and resume; a file is only ever in place once it is complete and correct."""
    from .data.download import LA_URL, download_la

    if dataset != "la":
        raise SemisegError(f"unknown dataset {dataset!r}; downloadable: la (ACDC, Pancreas-CT and BraTS need "
                           "registration: download them yourself, then `semiseg data convert`)")
    fetched, present = download_la(out, base_url or LA_URL, workers, progress=typer.echo)
    typer.echo(f"{fetched} downloaded, {present} already present and verified: {out}")


@data_app.command("convert")
def data_convert(
    dataset: Annotated[str, typer.Argument(help="acdc, pancreas or brats")],
    raw: Annotated[Path, typer.Argument(help="Folder of the raw public download")],
    out: Annotated[Path, typer.Option(help="Output folder in the protocol layout")],
    labels: Annotated[Path | None, typer.Option(help="pancreas: folder of the labelNNNN.nii.gz files")] = None,
    split_dir: Annotated[Path | None, typer.Option(help="brats: folder with SSL4MIS train.txt / val.txt / "
                                                   "test.txt to reuse")] = None,
    version: Version = False,
) -> None:
    """Convert a raw public dataset into the layout and preprocessing of its benchmark protocol."""
    from .data.convert import convert

    for line in convert(dataset, raw, out, labels=labels, split_dir=split_dir):
        typer.echo(line)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default RUN/report)")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset (default: the one the run was trained on)")] = None,
    split: Annotated[str, typer.Option(help="Evaluation to show: test or val")] = "test",
    version: Version = False,
) -> None:
    """Training curves, per-case overlays and an HTML page with the per-case metrics."""
    from .report import write_report

    result = write_report(run, out, data, split)
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"report: {result.index}")


def main() -> None:
    try:
        app()
    except SemisegError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
