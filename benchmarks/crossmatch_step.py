"""Time one CrossMatch training iteration at the official sizes, with its on-device augmentation share.

- `la`: VNet (16 filters), patch 112x112x80, batch 2 labelled + 2 unlabelled + 2 mix, AdamW (preset la-8);
- `acdc`: 2D UNet, 256x256 slices, batch 12 + 12 + 12, SGD with Nesterov (preset acdc-3).

Synthetic inputs (noisy blobs), so no dataset is needed. An iteration is the whole `train_step` (mix
teacher, strong views, CutMix, two perturbed forward passes, losses) plus backward and the optimiser step;
`augment` is the part spent in the strong views and CutMix boxes. Timers synchronise the GPU (here only,
never in training). Prints one JSON line per setting.

    python benchmarks/crossmatch_step.py                        # both settings on the default device
    python benchmarks/crossmatch_step.py --settings acdc --steps 1 --warmup 0 --update-md
    python benchmarks/crossmatch_step.py --settings la --batch 1,1 --steps 1 --warmup 0   # less memory
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, stamp, update_section  # noqa: E402

SETTINGS = {"la": ("la-8", (112, 112, 80), 2, 16), "acdc": ("acdc-3", (256, 256), 4, 16)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(patch: tuple[int, ...], labeled: int, unlabeled: int, classes: int, seed: int = 0):
    """Blobs with `classes - 1` nested foreground levels plus noise, images in [0, 1]."""
    from semiseg.data.loader import Batch

    g = torch.Generator().manual_seed(seed)
    n = labeled + unlabeled
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in patch], indexing="ij"))
    centres = (torch.rand(n, len(patch), *[1] * len(patch), generator=g) * 0.6 - 0.3)
    radius = (grid[None] - centres).square().sum(1).sqrt()
    label = sum((radius < 0.6 * (1 - k / classes)).long() for k in range(classes - 1))
    image = (label / (classes - 1) + 0.1 * torch.randn(label.shape, generator=g)).clamp(0, 1)[:, None]
    return Batch(image[:labeled], label[:labeled], image[labeled:], torch.arange(labeled))


def run(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    from semiseg.config import build_config
    from semiseg.engine.inference import autocast_for
    from semiseg.engine.trainer import build_optimizer, peak_memory_mb, resolve_device
    from semiseg.methods.base import NetSpec, StepContext
    from semiseg.nets import count_parameters

    preset, patch, classes, n_filters = SETTINGS[setting]
    overrides = {}
    if args.batch:
        labeled, per_stream = (int(v) for v in args.batch.split(","))
        overrides = {"batch_labeled": labeled, "batch_unlabeled": 2 * per_stream}
    cfg = build_config("crossmatch", None, overrides, preset)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    spec = NetSpec(1, classes, len(patch), n_filters)
    method = cfg.method_class()(cfg.method_params(), spec).to(device).train()
    optimizer = build_optimizer(cfg, method)
    batch = synthetic_batch(patch, cfg.batch_labeled, cfg.batch_unlabeled, classes).to(device)
    timings = {"augment": 0.0, "iteration": 0.0}

    def timed(fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            _sync(device)
            t = time.perf_counter()
            out = fn(*a, **k)
            _sync(device)
            timings["augment"] += time.perf_counter() - t
            return out
        return wrapper

    method.strong_views = timed(method.strong_views)
    method.cutmix_boxes = timed(method.cutmix_boxes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            timings.update(augment=0.0, iteration=0.0)
        _sync(device)
        t = time.perf_counter()
        with autocast_for(device) if not args.no_amp else torch.autocast(device.type, enabled=False):
            step = method.train_step(batch, StepContext(1000 + i, cfg.iterations))
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        _sync(device)
        timings["iteration"] += time.perf_counter() - t
    return {"setting": setting, "preset": preset, "device": str(device), "machine": machine(),
            "patch": list(patch), "batch": f"{cfg.batch_labeled}+{cfg.batch_unlabeled // 2}+{cfg.batch_unlabeled // 2}",
            "params": count_parameters(method.inference_network()), "amp": not args.no_amp, "steps": args.steps,
            "s_per_it": timings["iteration"] / args.steps, "augment_s_per_it": timings["augment"] / args.steps,
            "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", help="L,U: labelled and per-stream unlabelled batch instead of the preset's")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA (the trainer uses bf16 autocast)")
    parser.add_argument("--update-md", action="store_true", help="write the result into BENCHMARKS.md")
    args = parser.parse_args()
    results = []
    for setting in args.settings:
        results.append(run(setting, args))
        print(json.dumps(results[-1]), flush=True)
    if args.update_md:
        table = markdown_table(
            ["setting", "preset", "device", "input", "batch (L+U+mix)", "iteration s", "of which augment s",
             "peak MB"],
            [[r["setting"], r["preset"], r["device"], "x".join(map(str, r["patch"])), r["batch"],
              f"{r['s_per_it']:.2f}", f"{r['augment_s_per_it']:.2f}", f"{r['peak_mb']:.0f}"] for r in results])
        device = results[0]["device"].split(":")[0]
        command = " ".join(a for a in sys.argv[1:] if a != "--update-md")
        update_section(f"crossmatch-step-{device}", f"### CrossMatch training iteration ({device})\n\n{stamp()}\n\n"
                       f"Command: `python benchmarks/crossmatch_step.py {command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
