"""`semiseg` command line: methods, train, evaluate, predict, demo, report and data (prepare, download, convert).

User errors (`SemisegError`) print one line and exit with status 2; a traceback means a bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import SemisegError

if TYPE_CHECKING:
    from .config import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Semi-supervised medical image segmentation (CAML, MLRPL, CrossMatch and baselines).")


@app.command()
def methods() -> None:
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


@app.command()
def train(
    method: Annotated[str | None, typer.Option(help="Method name (see `semiseg methods`)")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset folder, or synthetic[:n_train=..,shape=WxHxD]")] = None,
    labeled: Annotated[int | None, typer.Option(help="Number of labelled training cases (first N)")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations")] = None,
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/run"),
    config: Annotated[Path | None, typer.Option(help="YAML config file")] = None,
    preset: Annotated[str | None, typer.Option(help="Named preset of the method, e.g. la-8")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override (repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output")] = False,
) -> None:
    """Train a method; writes config, logs, TensorBoard scalars and checkpoints into --out."""
    from .config import TrainConfig, build_config, parse_set
    from .engine.trainer import Trainer

    given = any(v is not None for v in (method, data, labeled, iterations, config, preset)) or bool(set_)
    cfg = TrainConfig()  # with --resume, replaced by the checkpoint's config
    if given or not resume:
        overrides = parse_set(set_ or [])
        for key, value in (("data", data), ("labeled", labeled), ("iterations", iterations)):
            if value is not None:
                overrides[key] = value
        cfg = build_config(method, config, overrides, preset)
    if resume and given:
        _check_same_config(cfg, out)
    checkpoint = Trainer(cfg, out, resume=resume, progress=not quiet).run()
    typer.echo(f"checkpoint: {checkpoint}")


def _check_same_config(cfg: TrainConfig, out: Path) -> None:
    """Re-running the original command with --resume is fine; changing the recipe mid-run is not."""
    import yaml

    from .config import TrainConfig

    saved_file = out / "config.yaml"
    if not saved_file.is_file():
        return  # the trainer reports the missing checkpoint
    saved = TrainConfig(**(yaml.safe_load(saved_file.read_text()) or {})).model_dump(mode="json")
    wanted = cfg.model_dump(mode="json")
    changed = [f"{k} (run {saved[k]!r}, given {wanted[k]!r})" for k in saved if saved[k] != wanted.get(k)]
    if changed:
        raise SemisegError(f"--resume continues {out} with its saved config, but the options change "
                           f"{', '.join(changed)}; drop them, or train into a new --out")


@app.command()
def evaluate(
    run: Annotated[Path | None, typer.Argument(help="Run folder or checkpoint file")] = None,
    data: Annotated[str | None, typer.Option(help="Dataset (default: the one the run was trained on)")] = None,
    split: Annotated[str, typer.Option(help="test or val")] = "test",
    out: Annotated[Path | None, typer.Option(help="Output folder (default RUN/eval-SPLIT)")] = None,
    pred: Annotated[Path | None, typer.Option(help="Score label maps in this folder instead of a model")] = None,
    checkpoint: Annotated[str, typer.Option(help="auto (the run's rule), last or best")] = "auto",
    lcc: Annotated[bool | None, typer.Option(help="Keep the largest connected component")] = None,
    empty_policy: Annotated[str | None, typer.Option(help="legacy_zero, nan or penalty")] = None,
    save_predictions: Annotated[bool, typer.Option(help="Also write the label maps")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    spacing: Annotated[str | None, typer.Option(
        help="X,Y,Z mm per voxel: HD95 / ASD in mm (default: voxels, as the papers)")] = None,
    cpu_bf16: Annotated[bool | None, typer.Option(
        help="bf16 autocast on CPU (faster on AVX512-BF16/AMX; rounding-level changes, stated on the card)")] = None,
    fold_bn: Annotated[bool | None, typer.Option(
        help="Fold BatchNorm into the convolutions (faster; rounding-level changes, stated on the card)")] = None,
) -> None:
    """Score a model (or a folder of predictions) with the papers' metrics and a protocol card."""
    from .engine.evaluate import evaluate_checkpoint, evaluate_predictions, format_card, format_summary, parse_spacing

    voxel_size = parse_spacing(spacing)

    if pred is not None:
        if data is None:
            raise SemisegError("--pred needs --data, the dataset whose labels are the reference")
        target = out or pred.parent / f"eval-{split}"
        summary = evaluate_predictions(pred, data, target, split, empty_policy or "legacy_zero", voxel_size)
    else:
        if run is None:
            raise SemisegError("give a run folder or checkpoint, or --pred DIR with --data")
        target = out or (run if run.is_dir() else run.parent) / f"eval-{split}"
        summary = evaluate_checkpoint(run, target, data, split, checkpoint, lcc, empty_policy, device,
                                      save_predictions, voxel_size, cpu_bf16, fold_bn)
    for line in [*format_summary(summary), *format_card(summary)]:
        typer.echo(line)
    typer.echo(f"protocol card and per-case metrics: {target / 'summary.json'}, {target / 'cases.csv'}")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder or checkpoint file")],
    inputs: Annotated[list[Path], typer.Argument(help="Images (.h5, .nii, .nii.gz, .nrrd; multi-channel as "
                                                  "CASE_0000, CASE_0001, ...) or folders of them")],
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("predictions"),
    normalize: Annotated[str, typer.Option(help="auto (the prepared dataset's recipe, else z-score NIfTI), "
                                           "zscore or none")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    data: Annotated[str | None, typer.Option(help="Training dataset, if moved since training (for its "
                                             "preprocessing)")] = None,
) -> None:
    """Write label maps for new images (NIfTI / NRRD on the input's grid, with its affine and header)."""
    from .engine.predict import predict_files

    for path in predict_files(checkpoint, inputs, out, device, normalize, data):
        typer.echo(str(path))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/demo"),
    method: Annotated[str, typer.Option(help="Method to train")] = "mlrpl",
    iterations: Annotated[int, typer.Option(help="Training iterations")] = 200,
) -> None:
    """Train and evaluate on the embedded synthetic dataset (no download), a few minutes on a CPU.

    The method's recipe runs at a small size: 4 labelled + 16 unlabelled synthetic cases of 96x96x64, patch
    64x64x32, 8 base filters, and every iteration-based schedule shrunk to the iteration budget.
    """
    from .config import build_config, scaled_schedules
    from .engine.evaluate import evaluate_checkpoint, format_summary
    from .engine.trainer import Trainer

    overrides = {"data": "synthetic:n_train=20,n_test=4,shape=96x96x64", "labeled": 4, "iterations": iterations,
                 "patch_size": (64, 64, 32), "stride": (16, 16, 8), "n_filters": 8, "checkpoint_every": 50,
                 "log_every": 25, **scaled_schedules(method, iterations)}
    cfg = build_config(method, None, overrides)
    resume = (out / "checkpoint.pt").exists()
    Trainer(cfg, out, resume=resume).run()
    summary = evaluate_checkpoint(out, out / "eval-test")
    unlabeled = summary["protocol"]["dataset"]["n_unlabeled"]
    typer.echo(f"{method} on synthetic data, {cfg.labeled} labelled + {unlabeled} unlabelled cases, "
               f"{iterations} iterations, {len(summary['cases'])} test cases:")
    for line in format_summary(summary):
        typer.echo(line)
    typer.echo(json.dumps({"summary": str(out / "eval-test" / "summary.json")}))


data_app = typer.Typer(no_args_is_help=True, help="Your own data: check and prepare it; convert or download "
                       "public datasets.")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    folder: Annotated[Path, typer.Argument(help="nnU-Net-style folder: dataset.json, imagesTr/, labelsTr/, ...")],
    out: Annotated[Path | None, typer.Option(help="Cache folder (default FOLDER/semiseg-prepared)")] = None,
    spacing: Annotated[str | None, typer.Option(help="Resample to X,Y,Z mm, or 'median' (default: native)")] = None,
    ct_window: Annotated[str | None, typer.Option(help="CT window LO,HI in HU (default: 0.5-99.5 % of the "
                                                  "labelled foreground)")] = None,
    check: Annotated[bool, typer.Option(help="Only check the files, write nothing")] = False,
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
    typer.echo(f"train with: semiseg train --data {folder if out is None else cache} --labeled "
               f"{len(manifest['labeled'])} --set patch_size=X,Y,Z (multiples of 16)")


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="la (the preprocessed LA-2018 files of the UA-MT protocol)")],
    out: Annotated[Path, typer.Option(help="Dataset folder to create")] = Path("data/LA"),
    base_url: Annotated[str | None, typer.Option(help="Where the case folders are served")] = None,
    workers: Annotated[int, typer.Option(help="Parallel downloads")] = 4,
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
