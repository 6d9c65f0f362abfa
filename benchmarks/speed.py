"""Speed and memory of every method at the paper's sizes (LA: batch 2+2, patch 112x112x80).

For each method, in a fresh process (so peak memory is its own), at a mid-run iteration (ramps at full weight,
BCP in its self-training stage): time to build one batch (data loading and
augmentation), time of one full training step split into the method's forward (`train_step`: networks,
teachers, augmentation, pseudo-labels, losses), the backward pass, and the update (optimiser step plus the method's
`after_step`, e.g. EMA teachers), each synchronised on GPU, and the
inference time of the evaluated network on LA test volumes at the protocol stride 18/18/4, metrics included.

    python benchmarks/speed.py --methods supervised caml mlrpl --data ../shared/data/LA --steps 3 --infer-cases 2

Writes benchmarks/results/speed-<device>.json and the matching section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, markdown_table, stamp, update_section  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, data: str, steps: int, warmup: int, infer_cases: int, device: str,
            overrides: list[str]) -> dict:
    from semiseg.config import build_config, parse_set
    from semiseg.data import load_cases
    from semiseg.data.loader import TwoStreamBatches
    from semiseg.engine.inference import InferenceProtocol, predict_volume
    from semiseg.engine.metrics import case_metrics
    from semiseg.engine.trainer import peak_memory_mb, setup
    from semiseg.methods.base import StepContext
    from semiseg.nets import count_parameters

    cls_presets = __import__("semiseg.methods", fromlist=["get_method"]).get_method(method).presets
    preset = "la-8" if "la-8" in cls_presets else None
    cfg = build_config(method, None, {"data": data, "labeled": 8, "device": device, **parse_set(overrides)}, preset)
    s = setup(cfg)
    dev = s.device
    lab = load_cases(s.layout, s.split.labeled, True)
    unl = load_cases(s.layout, s.split.unlabeled[:8], False) if cfg.batch_unlabeled else []
    batches = TwoStreamBatches(lab, unl, cfg.batch_labeled, cfg.batch_unlabeled,
                               s.layout.train_transform(tuple(cfg.patch_size), cfg.rot_flip), cfg.seed, 0,
                               warmup + steps)
    t0 = time.perf_counter()
    prepared = [batches[i] for i in range(warmup + steps)]
    data_s = (time.perf_counter() - t0) / len(prepared)
    method_obj, opt = s.method, s.optimizer
    method_obj.train()
    parts = {"forward": [], "backward": [], "update": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i, batch in enumerate(prepared):
        _sync(dev)
        t0 = time.perf_counter()
        batch = batch.to(dev)
        ctx = StepContext(cfg.iterations // 2 + i, cfg.iterations, len(lab))  # mid-run: full ramps, BCP stage 2
        with autocast:
            out = method_obj.train_step(batch, ctx)
        _sync(dev)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        _sync(dev)
        t2 = time.perf_counter()
        opt.step()
        method_obj.after_step(ctx)
        _sync(dev)
        if i >= warmup:
            for key, value in zip(parts, (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                parts[key].append(value)
    train_peak = peak_memory_mb(dev)
    mean = {key: sum(values) / len(values) for key, values in parts.items()}
    result = {"method": method, "preset": preset, "device": str(dev), "patch": list(cfg.patch_size),
              "batch": f"{cfg.batch_labeled}+{cfg.batch_unlabeled}", "params": count_parameters(method_obj),
              "data_s_per_batch": data_s, "step_s": sum(mean.values()), "forward_s": mean["forward"],
              "backward_s": mean["backward"], "update_s": mean["update"], "steps": len(parts["forward"]),
              "train_peak_mb": train_peak}
    if infer_cases:
        net = method_obj.inference_network()
        method_obj.eval()
        protocol = InferenceProtocol(patch_size=tuple(cfg.patch_size), stride=tuple(cfg.stride))
        times = []
        for case_id in s.layout.test_ids[:infer_cases]:
            case = s.layout.read_eval(case_id)
            _sync(dev)
            t = time.perf_counter()
            pred = predict_volume(net, case.image, protocol, dev)
            case_metrics(pred == 1, case.label == 1)
            times.append(time.perf_counter() - t)
            print(f"{method}: {case_id} inferred and scored in {times[-1]:.1f} s", file=sys.stderr, flush=True)
        result.update({"infer_s_per_volume": sum(times) / len(times), "infer_volumes": len(times),
                       "peak_mb": peak_memory_mb(dev)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "LA"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--infer-cases", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value config override")
    parser.add_argument("--tag", default="", help="suffix of the result file and BENCHMARKS.md section")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.steps, args.warmup, args.infer_cases, args.device,
                                 args.overrides)))
        return
    from semiseg.methods import available_methods

    methods = args.methods or [m for m, cls in available_methods().items()]
    results = []
    for name in methods:
        cmd = [sys.executable, __file__, "--one", name, "--data", args.data, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--infer-cases", str(args.infer_cases), "--device", args.device,
               *[f"--set={o}" for o in args.overrides]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's stderr (progress) passes through
        if proc.returncode != 0:
            print(f"{name}: failed (exit {proc.returncode}; its error is above)", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    device = results[0]["device"].split(":")[0] if results else "none"
    name = f"speed-{device}" + (f"-{args.tag}" if args.tag else "")
    out = REPO / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps({"stamp": stamp(), "results": results}, indent=1))
    rows = [[r["method"], r["preset"] or "-", r["batch"], f"{r['params']:,}", f"{r['data_s_per_batch']:.3f}",
             f"{r['step_s']:.2f}", f"{r['forward_s']:.2f}", f"{r['backward_s']:.2f}", f"{r['update_s']:.3f}",
             f"{r['train_peak_mb']:.0f}",
             f"{r['infer_s_per_volume']:.1f} ({r['infer_volumes']})" if "infer_s_per_volume" in r else "not measured"]
            for r in results]
    table = markdown_table(["method", "preset", "batch (L+U)", "params", "data s/batch", "step s/it",
                            "of which forward s", "backward s", "optimiser + EMA s", "peak MB (train)",
                            "inference s/volume (volumes)"], rows)
    sets = "".join(f" --set {o}" for o in args.overrides)
    methods = " --methods " + " ".join(args.methods) if args.methods else ""
    tag = f" --tag {args.tag}" if args.tag else ""
    cmd = (f"python benchmarks/speed.py{methods} --steps {args.steps} --warmup {args.warmup} "
           f"--infer-cases {args.infer_cases}{sets}{tag}")
    update_section(name, f"### Speed and memory, {name}\n\n{stamp()}\n\nCommand: `{cmd}`\n\n{table}\n")


if __name__ == "__main__":
    main()
