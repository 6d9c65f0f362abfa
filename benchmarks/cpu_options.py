"""Which CPU speed options pay, per method, and the LA-mini per-iteration time of every method after them.

`options` (default): every method's training step at the LA-mini shape (patch 64x64x32, 8 filters, batch of its
la-8 preset, synthetic volumes), in the NCDHW layout, in channels-last 3D, and in channels-last with bf16
autocast (`cpu_bf16`); for UA-MT also with one teacher call per Monte-Carlo pass (`single_pass=false`, the
official way). Variants are interleaved within each of `--rounds` rounds (A, B, C, A, B, C, ...) and the table
gives the median over rounds of each variant's mean step time, with the step's GFLOP (flop counter) and GFLOP/s.

`malloc`: every method's training step at the LA-mini shape (as `options`, channels-last) with glibc's malloc
left alone (`cpu_malloc=system`) and keeping freed memory for reuse (`cpu_malloc=keep`, the default), each
measurement in a fresh process (the malloc setting is process-wide), variants interleaved within each of
`--rounds` rounds: median s/step, minor page faults per timed step, the process's peak resident set (MiB), and
whether the parameters after the timed steps are bit-identical.

    python benchmarks/cpu_options.py malloc --rounds 3 --update-md

`la-mini`: `--iterations` real training iterations of every method at the config of benchmarks/la_mini.py
(LA downsampled x2, patch 64x64x32, stride 9/9/2, 8 filters, la-8 presets with schedules scaled to the budget, one
loader worker), through the trainer with its defaults (`channels_last=auto`); s/it is the trainer's own
`s_per_it` over the second half of the iterations (the first half holds the warm-up).

`inference`: a VNet trained briefly on LA-mini (8 filters, benchmarks/vs_official.py's evaluation model) evaluated
on `--cases` LA-mini test volumes with the default fp32 path and with the inference options (`fold_bn`,
`cpu_bf16`, both), interleaved over `--rounds`: seconds per volume and the largest per-case Dice change against fp32
(the issue's bar for bf16: within 0.1 point).

    python benchmarks/cpu_options.py options --rounds 3 --update-md
    python benchmarks/cpu_options.py la-mini --iterations 8 --update-md
`windows`: the paper-size evaluation network (VNet, 16 filters, 112x112x80 windows) on `--cases` full-size LA test
volumes at stride 56/40 with 1, 2 and 4 windows per forward pass, interleaved over `--rounds`: seconds per volume
(median) and whether the label maps are identical, to choose `semiseg.engine.model_file.CPU_WINDOWS` (the memory
side, about 320-360 MiB per extra window, is measured by `lean_artifacts.py`). The weights are random (seed 0): the
time of a forward pass does not depend on them.

    python benchmarks/cpu_options.py inference --cases 4 --rounds 2 --update-md
    python benchmarks/cpu_options.py windows --cases 1 --rounds 3 --update-md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402

MINI = ["patch_size=64,64,32", "stride=9,9,2", "n_filters=8"]
VARIANTS = {"NCDHW": ["channels_last=off"], "channels-last": ["channels_last=on"],
            "channels-last + bf16": ["channels_last=on", "cpu_bf16=true"]}
SYNTHETIC = "synthetic:n_train=16,n_test=1,shape=72x72x40"


def options(methods: list[str], rounds: int, steps: int) -> list[dict]:
    from speed import measure

    rows = []
    for method in methods:
        variants = dict(VARIANTS)
        if method == "uamt":
            variants["channels-last, per-pass teacher calls"] = ["channels_last=on", "single_pass=false"]
        times: dict[str, list[float]] = {v: [] for v in variants}
        flops: dict[str, float] = {}
        for _ in range(rounds):
            for name, sets in variants.items():
                r = measure(method, SYNTHETIC, steps, 1, 0, "cpu", [*MINI, *sets])
                times[name].append(r["step_s"])
                flops[name] = r["gflop_per_step"]
                print(f"{method} {name}: {r['step_s']:.3f} s", file=sys.stderr, flush=True)
        med = {v: statistics.median(t) for v, t in times.items()}
        rows.append({"method": method, "median_s": med, "all_s": times, "gflop": flops})
    return rows


MALLOC_VARIANTS = ("system", "keep")


def malloc_child(method: str, variant: str, steps: int) -> dict:
    """One measurement of `malloc` (run in its own process): the step, its page faults, this process's peak and a
    digest of the parameters after the steps."""
    import resource

    import torch
    from speed import measure

    torch.manual_seed(0)  # the same initial weights and dropout masks in every process
    r = measure(method, SYNTHETIC, steps, 1, 0, "cpu", [*MINI, "channels_last=on", f"cpu_malloc={variant}"],
                digest=True)
    return {**r, "variant": variant, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def malloc(methods: list[str], rounds: int, steps: int) -> list[dict]:
    rows = []
    for method in methods:
        runs: dict[str, list[dict]] = {v: [] for v in MALLOC_VARIANTS}
        for _ in range(rounds):
            for variant in MALLOC_VARIANTS:
                out = subprocess.run([sys.executable, __file__, "malloc-child", "--methods", method, "--variant",
                                      variant, "--steps", str(steps)], capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = runs[variant][-1]
                print(f"{method} {variant}: {r['step_s']:.3f} s, {r['page_faults_per_step']:.0f} faults/step, "
                      f"peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        row = {"method": method, "gflop": runs["keep"][0]["gflop_per_step"],
               "identical": len({r["digest"] for v in runs.values() for r in v}) == 1}
        for variant, measured in runs.items():
            row[variant] = {"median_s": statistics.median(r["step_s"] for r in measured),
                            "all_s": [r["step_s"] for r in measured],
                            "faults": statistics.median(r["page_faults_per_step"] for r in measured),
                            "peak_rss_mib": max(r["peak_rss_mib"] for r in measured)}
        rows.append(row)
    return rows


def la_mini(methods: list[str], iterations: int, la: Path, work: Path) -> list[dict]:
    from la_mini import prepare, scaled_overrides

    from semiseg.config import build_config, parse_set
    from semiseg.engine.trainer import Trainer
    from semiseg.methods import get_method

    data = prepare(la, work / "la-mini-data")
    rows = []
    for method in methods:
        preset = "la-8" if "la-8" in get_method(method).presets else None
        sets = [*MINI, f"checkpoint_every={iterations}", f"log_every={iterations // 2}", "num_workers=1",
                "device=cpu", *scaled_overrides(method, 1000)]  # the schedules of a 1000-iteration LA-mini run
        cfg = build_config(method, None, {"data": str(data), "labeled": 8, "iterations": iterations,
                                          **parse_set(sets)}, preset)
        out = Path(tempfile.mkdtemp(prefix=f"cpu-options-{method}-", dir=work))
        Trainer(cfg, out, progress=False).run()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steady = [r["s_per_it"] for r in records if "s_per_it" in r][-1]
        summary = json.loads((out / "train_summary.json").read_text())
        rows.append({"method": method, "iterations": iterations, "s_per_it": steady,
                     "s_per_it_all": summary["s_per_it"], "peak_mb": summary["peak_memory_mb"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def inference(cases: int, rounds: int, la: Path, work: Path) -> list[dict]:
    import time

    import torch
    from la_mini import prepare
    from vs_official import EVAL_ITERATIONS, train_eval_model

    from semiseg.config import TrainConfig
    from semiseg.data import open_dataset
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.engine.inference import predict_volume
    from semiseg.engine.metrics import dice
    from semiseg.engine.trainer import build_method, inference_protocol
    from semiseg.methods.base import NetSpec

    data = prepare(la, work / "la-mini-data")
    run = train_eval_model(data, work / "eval-model", EVAL_ITERATIONS)
    payload = load_checkpoint(run / "checkpoint.pt")
    cfg = TrainConfig(**payload["config"])
    method = build_method(cfg, NetSpec(**payload["spec"]), torch.device("cpu"))
    method.load_state_dict(payload["method"])
    net = method.inference_network().eval()
    layout = open_dataset(str(data))
    volumes = [layout.read_eval(c) for c in layout.test_ids[:cases]]
    variants = {"fp32 (default)": {}, "fold_bn": {"fold_bn": True}, "cpu_bf16": {"cpu_bf16": True},
                "fold_bn + cpu_bf16": {"fold_bn": True, "cpu_bf16": True}}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    dices: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, options in variants.items():
            protocol = inference_protocol(cfg.model_copy(update=options), layout)
            t0 = time.perf_counter()
            preds = [predict_volume(net, v.image, protocol, torch.device("cpu")) for v in volumes]
            seconds[name].append((time.perf_counter() - t0) / len(volumes))
            dices[name] = [100 * dice(p == 1, v.label == 1) for p, v in zip(preds, volumes, strict=True)]
            print(f"inference {name}: {seconds[name][-1]:.2f} s/volume", file=sys.stderr, flush=True)
    base = dices["fp32 (default)"]
    return [{"variant": name, "s_per_volume": statistics.median(seconds[name]), "all_s": seconds[name],
             "mean_dice": statistics.mean(dices[name]),
             "max_abs_dice_change": max(abs(a - b) for a, b in zip(dices[name], base, strict=True))}
            for name in variants]


def windows(cases: int, rounds: int, la: Path, sizes: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    import time

    import torch

    from semiseg.data import open_dataset
    from semiseg.engine.inference import sliding_window_probs
    from semiseg.engine.reductions import class_argmax
    from semiseg.methods.base import NetSpec
    from semiseg.nets import default_network

    torch.manual_seed(0)
    net = default_network(NetSpec(n_filters=16)).eval()  # in the layout `semiseg evaluate` runs it (NCDHW)
    layout = open_dataset(str(la))
    volumes = [torch.from_numpy(layout.read_eval(c).image).float() for c in layout.test_ids[:cases]]
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    labels: dict[int, list[torch.Tensor]] = {}
    for _ in range(rounds):
        for n in sizes:
            t0 = time.perf_counter()
            labels[n] = [class_argmax(sliding_window_probs(net, v, (112, 112, 80), (56, 56, 40), n), 0)
                         for v in volumes]
            seconds[n].append((time.perf_counter() - t0) / len(volumes))
            print(f"windows {n}: {seconds[n][-1]:.2f} s/volume", file=sys.stderr, flush=True)
    return [{"windows": n, "s_per_volume": statistics.median(seconds[n]), "all_s": seconds[n],
             "labels_identical": all(torch.equal(a, b) for a, b in zip(labels[n], labels[sizes[0]], strict=True))}
            for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="options",
                        choices=["options", "malloc", "malloc-child", "la-mini", "inference", "windows"])
    parser.add_argument("--variant", choices=MALLOC_VARIANTS, help="malloc-child: the cpu_malloc setting")
    parser.add_argument("--cases", type=int, default=4, help="test volumes (inference: LA-mini, windows: LA)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--iterations", type=int, default=8, help="la-mini: training iterations per method")
    parser.add_argument("--la", type=Path, default=REPO.parent / "shared" / "data" / "LA")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "semiseg-cpu-options")
    parser.add_argument("--update-md", action="store_true")
    args = parser.parse_args()
    from semiseg.methods import available_methods

    methods = args.methods or [m for m in available_methods() if m != "nan_at_three"]
    args.work.mkdir(parents=True, exist_ok=True)
    results = REPO / "benchmarks" / "results"
    if args.mode == "malloc-child":
        print(json.dumps(malloc_child(methods[0], args.variant, args.steps)))
    elif args.mode == "malloc":
        rows = malloc(methods, args.rounds, args.steps)
        (results / "cpu_malloc.json").write_text(json.dumps({"stamp": stamp(), "rows": rows}, indent=1))
        md = markdown_table(["method", "system s/step", "keep s/step", "speed-up", "page faults/step, system",
                             "keep", "peak RSS MiB, system", "keep", "parameters bit-identical"],
                            [[r["method"], f"{r['system']['median_s']:.3f}", f"{r['keep']['median_s']:.3f}",
                              f"{r['system']['median_s'] / r['keep']['median_s']:.2f}x",
                              f"{r['system']['faults']:,.0f}", f"{r['keep']['faults']:,.0f}",
                              f"{r['system']['peak_rss_mib']:.0f}", f"{r['keep']['peak_rss_mib']:.0f}",
                              "yes" if r["identical"] else "**no**"] for r in rows])
        print(md)
        if args.update_md:
            chosen = f" --methods {' '.join(args.methods)}" if args.methods else ""
            update_section("cpu-malloc", f"### Keeping freed memory on CPU (`cpu_malloc`), LA-mini shape\n\n"
                           f"{stamp()}\n\nCommand: `python benchmarks/cpu_options.py malloc{chosen} --rounds "
                           f"{args.rounds} --steps {args.steps}` (each measurement a fresh process; median over "
                           f"{args.rounds} interleaved rounds; channels-last, fp32, synthetic volumes)\n\n{md}\n")
    elif args.mode == "options":
        rows = options(methods, args.rounds, args.steps)
        (results / "cpu_options.json").write_text(json.dumps({"stamp": stamp(), "rows": rows}, indent=1))
        table = []
        for r in rows:
            m = r["median_s"]
            extra = m.get("channels-last, per-pass teacher calls")
            table.append([r["method"], f"{m['NCDHW']:.3f}", f"{m['channels-last']:.3f}",
                          f"{m['channels-last + bf16']:.3f}", f"{m['NCDHW'] / m['channels-last']:.2f}x",
                          f"{m['channels-last'] / m['channels-last + bf16']:.2f}x",
                          f"{extra:.3f} ({extra / m['channels-last']:.2f}x)" if extra else "-",
                          f"{r['gflop']['channels-last']:.1f}",
                          f"{r['gflop']['channels-last'] / m['channels-last']:.0f}"])
        md = markdown_table(["method", "NCDHW s/step", "channels-last s/step", "CL + bf16 s/step",
                             "CL speed-up", "bf16 speed-up (on CL)", "UA-MT per-pass teacher calls s/step",
                             "GFLOP/step", "GFLOP/s (CL, fp32)"], table)
        print(md)
        if args.update_md:
            update_section("cpu-options", f"### CPU options per method, LA-mini shape\n\n{stamp()}\n\nCommand: "
                           f"`python benchmarks/cpu_options.py options --rounds {args.rounds} --steps {args.steps}`"
                           f" (median over {args.rounds} interleaved rounds)\n\n{md}\n")
    elif args.mode == "inference":
        rows = inference(args.cases, args.rounds, args.la, args.work)
        (results / "cpu_inference.json").write_text(json.dumps({"stamp": stamp(), "rows": rows}, indent=1))
        base = rows[0]["s_per_volume"]
        md = markdown_table(["inference path", "s/volume", "speed-up", "mean Dice %", "largest per-case Dice change"],
                            [[r["variant"], f"{r['s_per_volume']:.2f}", f"{base / r['s_per_volume']:.2f}x",
                              f"{r['mean_dice']:.2f}", f"{r['max_abs_dice_change']:.3f} points"] for r in rows])
        print(md)
        if args.update_md:
            update_section("cpu-inference", f"### Inference options on CPU, LA-mini volumes\n\n{stamp()}\n\nCommand: "
                           f"`python benchmarks/cpu_options.py inference --cases {args.cases} --rounds {args.rounds}`"
                           f" (median over rounds; patch 64x64x32, stride 9/9/2, 8 filters)\n\n{md}\n")
    elif args.mode == "windows":
        rows = windows(args.cases, args.rounds, args.la)
        (results / "cpu_windows.json").write_text(json.dumps({"stamp": stamp(), "rows": rows}, indent=1))
        base = rows[0]["s_per_volume"]
        md = markdown_table(["windows per forward pass", "s/volume (median)", "each round", "vs 1 window",
                             "labels identical to 1 window"],
                            [[str(r["windows"]), f"{r['s_per_volume']:.2f}", " / ".join(f"{t:.2f}" for t in r["all_s"]),
                              f"{r['s_per_volume'] / base:.2f}x", "yes" if r["labels_identical"] else "no"]
                             for r in rows])
        print(md)
        if args.update_md:
            update_section("cpu-windows", f"### Windows per forward pass on CPU, paper-size evaluation\n\n{stamp()}"
                           f"\n\nCommand: `python benchmarks/cpu_options.py windows --cases {args.cases} --rounds "
                           f"{args.rounds}` (VNet 16 filters, 112x112x80 windows, stride 56/40, full-size LA test "
                           f"volumes; median over interleaved rounds)\n\n{md}\n")
    else:
        rows = la_mini(methods, args.iterations, args.la, args.work)
        (results / "la_mini_speed.json").write_text(json.dumps({"stamp": stamp(), "rows": rows}, indent=1))
        md = markdown_table(["method", "iterations", "s/it (second half)", "s/it (all, with warm-up)", "peak MB"],
                            [[r["method"], str(r["iterations"]), f"{r['s_per_it']:.3f}", f"{r['s_per_it_all']:.3f}",
                              f"{r['peak_mb']:.0f}"] for r in rows])
        print(md)
        if args.update_md:
            update_section("speed-la-mini", f"### LA-mini per-iteration time after the CPU speed work\n\n{stamp()}"
                           f"\n\nCommand: `python benchmarks/cpu_options.py la-mini --iterations {args.iterations}`"
                           f" (trainer defaults: channels_last=auto, fp32)\n\n{md}\n")


if __name__ == "__main__":
    main()
