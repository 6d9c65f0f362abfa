"""Speed and memory of every method at the paper's sizes (LA: batch 2+2, patch 112x112x80).

For each method, in a fresh process (so peak memory is its own), at a mid-run iteration (ramps at full weight,
BCP in its self-training stage): time to build one batch (data loading and
augmentation), time of one full training step split into the method's forward (`train_step`: networks,
teachers, augmentation, pseudo-labels, losses), the backward pass, and the update (optimiser step plus the method's
`after_step`, e.g. EMA teachers), each synchronised on GPU, and the
inference time of the evaluated network on LA test volumes at the protocol stride 18/18/4, metrics included.

Roofline: each row also gets the step's floating-point operations (forward + backward, every network pass of the
method, counted by `torch.utils.flop_counter` on one extra untimed step: convolutions and matrix products, which
are all but a few percent of the arithmetic) and the achieved GFLOP/s. `--peak` first measures the machine's fp32
peak (a large matmul and a large 3D convolution in both layouts, the best taken) and adds a "% of peak" column;
the peak is written to benchmarks/results/peak-<device>.json and the "peak-<device>" section of BENCHMARKS.md.

    python benchmarks/speed.py --methods supervised caml mlrpl --data ../shared/data/LA --steps 3 --infer-cases 2
    python benchmarks/speed.py --peak --methods supervised --steps 2 --infer-cases 0 --tag roofline

Writes benchmarks/results/speed-<device>.json and the matching section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
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
            overrides: list[str], digest: bool = False) -> dict:
    """`digest`: also a SHA-256 of every tensor of the method's state after the timed steps (to check that an
    option changes no number)."""
    from torch.utils.flop_counter import FlopCounterMode

    from semiseg.config import build_config, parse_set
    from semiseg.data import load_cases
    from semiseg.data.loader import TwoStreamBatches
    from semiseg.engine.inference import InferenceProtocol, autocast_for, predict_volume
    from semiseg.engine.metrics import case_metrics
    from semiseg.engine.trainer import peak_memory_mb, setup, uses_channels_last
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
    channels_last = uses_channels_last(cfg, dev, s.method.spec.spatial_dims)

    def autocast():  # the trainer's
        return autocast_for(dev, cfg.cpu_bf16) if cfg.amp else torch.autocast(dev.type, enabled=False)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    faults = 0  # minor page faults of the timed steps (the kernel mapping in fresh pages)
    for i, batch in enumerate(prepared):
        _sync(dev)
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        batch = batch.to(dev, channels_last)
        ctx = StepContext(cfg.iterations // 2 + i, cfg.iterations, len(lab))  # mid-run: full ramps, BCP stage 2
        with autocast():
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
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    train_peak = peak_memory_mb(dev)
    state_digest = None
    if digest:
        sha = hashlib.sha256()
        for tensor in method_obj.state_dict().values():
            sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        state_digest = sha.hexdigest()
    counter = FlopCounterMode(display=False)
    with counter:  # one more step, untimed, for its arithmetic
        with autocast():
            out = method_obj.train_step(prepared[-1].to(dev, channels_last),
                                        StepContext(cfg.iterations // 2, cfg.iterations, len(lab)))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
    mean = {key: sum(values) / len(values) for key, values in parts.items()}
    result = {"method": method, "preset": preset, "device": str(dev), "patch": list(cfg.patch_size),
              "batch": f"{cfg.batch_labeled}+{cfg.batch_unlabeled}", "params": count_parameters(method_obj),
              "data_s_per_batch": data_s, "step_s": sum(mean.values()), "forward_s": mean["forward"],
              "backward_s": mean["backward"], "update_s": mean["update"], "steps": len(parts["forward"]),
              "train_peak_mb": train_peak, "channels_last": channels_last, "cpu_bf16": cfg.cpu_bf16,
              "threads": torch.get_num_threads(), "gflop_per_step": counter.get_total_flops() / 1e9,
              "page_faults_per_step": faults / len(parts["forward"]), "digest": state_digest}
    result["gflops"] = result["gflop_per_step"] / result["step_s"]
    if infer_cases:
        net = method_obj.inference_network()
        method_obj.eval()
        protocol = InferenceProtocol(patch_size=tuple(cfg.patch_size), stride=tuple(cfg.stride),
                                     cpu_bf16=cfg.cpu_bf16, fold_bn=cfg.fold_bn)
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


def _rate(fn, flop: float, repeats: int) -> float:
    """Best GFLOP/s of `fn` over `repeats` timed calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def measure_peak(repeats: int = 5) -> dict:
    """fp32 GFLOP/s of a 4096^3 matmul and of a VNet-like 3x3x3 conv3d (32 -> 32 channels, batch 2, 64x64x48)
    in both memory layouts, forward; bf16 matmul for reference. FLOPs as the flop counter counts them (2 per
    multiply-add)."""
    torch.manual_seed(0)
    out: dict = {"threads": torch.get_num_threads()}
    with torch.no_grad():
        n = 4096
        a, b = torch.randn(n, n), torch.randn(n, n)
        out["matmul_fp32"] = _rate(lambda: a @ b, 2 * n ** 3, repeats)
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["matmul_bf16"] = _rate(lambda: a16 @ b16, 2 * n ** 3, repeats)
        conv = torch.nn.Conv3d(32, 32, 3, padding=1)
        x = torch.randn(2, 32, 64, 64, 48)
        flop = 2 * x.numel() * 32 * 27
        out["conv3d_fp32_ncdhw"] = _rate(lambda: conv(x), flop, repeats)
        conv_cl = conv.to(memory_format=torch.channels_last_3d)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        out["conv3d_fp32_channels_last"] = _rate(lambda: conv_cl(x_cl), flop, repeats)
    out["peak_fp32"] = max(out["matmul_fp32"], out["conv3d_fp32_ncdhw"], out["conv3d_fp32_channels_last"])
    return out


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
    parser.add_argument("--peak", action="store_true", help="measure the fp32 peak first (the roofline)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.data, args.steps, args.warmup, args.infer_cases, args.device,
                                 args.overrides)))
        return
    from semiseg.methods import available_methods

    device_name = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    peak_file = REPO / "benchmarks" / "results" / f"peak-{device_name}.json"
    if args.peak:
        if device_name != "cpu":
            raise SystemExit("--peak measures the CPU; on a GPU take the vendor's figure")
        peak = measure_peak()
        peak_file.write_text(json.dumps({"stamp": stamp(), **peak}, indent=1))
        rows = [[key, f"{peak[key]:.0f}"] for key in ("matmul_fp32", "conv3d_fp32_ncdhw", "conv3d_fp32_channels_last",
                                                      "matmul_bf16")]
        update_section(f"peak-{device_name}", f"### Measured peak, {device_name}\n\n{stamp()}\n\nCommand: "
                       f"`python benchmarks/speed.py --peak ...` (`measure_peak`: best of 5 after a warm-up)\n\n"
                       + markdown_table(["kernel", "GFLOP/s"], rows)
                       + f"\n\nfp32 peak taken for the roofline: **{peak['peak_fp32']:.0f} GFLOP/s**.\n")
        print(json.dumps(peak), flush=True)
    peak_fp32 = json.loads(peak_file.read_text())["peak_fp32"] if peak_file.is_file() else None
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
             f"{r['train_peak_mb']:.0f}", f"{r['gflop_per_step']:.1f}", f"{r['gflops']:.0f}",
             f"{100 * r['gflops'] / peak_fp32:.0f} %" if peak_fp32 else "no peak measured",
             ("CL" if r["channels_last"] else "NCDHW") + (" bf16" if r["cpu_bf16"] else ""),
             f"{r['infer_s_per_volume']:.1f} ({r['infer_volumes']})" if "infer_s_per_volume" in r else "not measured"]
            for r in results]
    table = markdown_table(["method", "preset", "batch (L+U)", "params", "data s/batch", "step s/it",
                            "of which forward s", "backward s", "optimiser + EMA s", "peak MB (train)",
                            "GFLOP/step", "GFLOP/s", "of fp32 peak", "layout", "inference s/volume (volumes)"], rows)
    sets = "".join(f" --set {o}" for o in args.overrides)
    methods = " --methods " + " ".join(args.methods) if args.methods else ""
    tag = f" --tag {args.tag}" if args.tag else ""
    cmd = (f"python benchmarks/speed.py{methods} --steps {args.steps} --warmup {args.warmup} "
           f"--infer-cases {args.infer_cases}{sets}{tag}" + (" --peak" if args.peak else ""))
    peak_note = (f"\n\nRoofline: measured fp32 peak {peak_fp32:.0f} GFLOP/s (section \"peak-{device_name}\"); "
                 "GFLOP/step by `torch.utils.flop_counter` (forward + backward of every pass in the step)."
                 if peak_fp32 else "")
    update_section(name, f"### Speed and memory, {name}\n\n{stamp()}\n\nCommand: `{cmd}`\n\n{table}{peak_note}\n")


if __name__ == "__main__":
    main()
