"""Time one CAML training iteration at the protocol size, split into the networks' part and OCC.

Batch 2 labelled + 2 unlabelled, patch 112x112x80, 16 filters, 8 memory slots (la-8) by default, on synthetic
ellipsoid volumes (no dataset needed), past the ramp-up so every term is active. Per iteration:

- `iteration_s`: the real `train_step` + backward + SGD step;
- `occ_forward_s`: OCC's forward inside it (bank update, sampling, top-k, heads, correlation, loss);
- `occ_backward_s`: OCC's own backward, down to the two embeddings and the heads, timed by a separate
  `autograd.grad` probe outside the iteration timer (the networks' backward below x9 is shared with the other
  losses, so it is counted as networks);
- `networks_s` = iteration - OCC: forward + backward of both VNets, supervised and mutual losses, SGD.

The official code takes 3.4-5.4 s/it on a TITAN RTX with its CPU memory bank. Timers synchronise the GPU
(here only, never in training). Prints one JSON line.

    python benchmarks/caml_step.py                       # protocol size on the default device
    python benchmarks/caml_step.py --patch 64,64,48 --n-filters 8 --steps 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, stamp, update_section  # noqa: E402


def synthetic_batches(n: int, patch: tuple[int, ...], labeled: int, seed: int = 0) -> list:
    """`n` batches of noisy ellipsoids (2 labelled + 2 unlabelled), labelled slots cycling over `labeled`."""
    from semiseg.data.loader import Batch

    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in patch], indexing="ij"))
    out = []
    for i in range(n):
        centres = torch.rand(4, 3, 1, 1, 1, generator=g) * 0.6 - 0.3
        label = ((grid[None] - centres).square().sum(1) < 0.3).long()
        image = (label.float() + 0.5 * torch.randn(4, *patch, generator=g))[:, None]
        index = torch.tensor([(2 * i) % labeled, (2 * i + 1) % labeled])
        out.append(Batch(image[:2], label[:2], image[2:], index))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from semiseg.config import parse_set
    from semiseg.engine.inference import autocast_for
    from semiseg.engine.trainer import peak_memory_mb, resolve_device
    from semiseg.methods.base import NetSpec, StepContext
    from semiseg.methods.caml import CAML, CAMLParams

    device = resolve_device(args.device)
    patch = tuple(int(v) for v in args.patch.split(","))
    torch.manual_seed(0)
    params = CAMLParams(**parse_set(args.set))
    method = CAML(params, NetSpec(n_filters=args.n_filters)).to(device).train()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = [b.to(device) for b in synthetic_batches(args.warmup + args.steps, patch, args.labeled)]
    heads = [p for name, p in method.named_parameters() if "projection" in name or "prediction" in name]
    real_occ = method.occ_loss
    probe: dict[str, Any] = {}

    def timed_occ(out: Any, *rest: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _sync(device)
        t = time.perf_counter()
        loss, rows = real_occ(out, *rest)
        _sync(device)
        probe.update(forward=time.perf_counter() - t, loss=loss, inputs=[out.emb_v, out.emb_a, *heads])
        return loss, rows

    method.occ_loss = timed_occ
    autocast = autocast_for(device) if not args.no_amp else torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals = {"iteration": 0.0, "occ_forward": 0.0, "occ_backward": 0.0}
    for i, batch in enumerate(batches):
        _sync(device)
        t = time.perf_counter()
        with autocast:
            step = method.train_step(batch, StepContext(3000 + i, 15000, args.labeled))
        _sync(device)
        elapsed = time.perf_counter() - t
        t = time.perf_counter()
        torch.autograd.grad(params.consistency_o * probe["loss"], probe["inputs"], retain_graph=True, allow_unused=True)
        _sync(device)
        occ_backward = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        optimizer.step()
        _sync(device)
        elapsed += time.perf_counter() - t
        if i >= args.warmup:
            totals["iteration"] += elapsed
            totals["occ_forward"] += probe["forward"]
            totals["occ_backward"] += occ_backward
        probe.clear()
    method.occ_loss = real_occ
    per_it = {k: v / args.steps for k, v in totals.items()}
    occ = per_it["occ_forward"] + per_it["occ_backward"]
    return {"device": str(device), "machine": machine(), "patch": list(patch), "batch": "2+2",
            "n_filters": args.n_filters, "memory_slots": args.labeled, "quirks": params.quirks,
            "amp": not args.no_amp and device.type == "cuda", "steps": args.steps,
            "iteration_s": per_it["iteration"], "networks_s": per_it["iteration"] - occ,
            "occ_forward_s": per_it["occ_forward"], "occ_backward_s": per_it["occ_backward"],
            "occ_share": occ / per_it["iteration"], "peak_mb": peak_memory_mb(device),
            "memory_bank_mb": (method.memory_features.numel() * 4 + method.memory_labels.numel()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", default="112,112,80")
    parser.add_argument("--n-filters", type=int, default=16)
    parser.add_argument("--labeled", type=int, default=8, help="memory slots (labelled cases)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-amp", action="store_true", help="float32 on CUDA (the trainer uses bf16 autocast)")
    parser.add_argument("--set", action="append", default=[], help="CAML parameter key=value, e.g. quirks=corrected")
    parser.add_argument("--update-md", action="store_true", help="write the result into BENCHMARKS.md")
    args = parser.parse_args()
    result = run(args)
    print(json.dumps(result), flush=True)
    if args.update_md:
        r = result
        table = markdown_table(
            ["device", "patch", "filters", "slots", "quirks", "iteration s", "networks fwd+bwd s",
             "OCC fwd s", "OCC bwd s", "OCC share", "peak MB", "bank MB"],
            [[r["device"], "x".join(map(str, r["patch"])), str(r["n_filters"]), str(r["memory_slots"]), r["quirks"],
              f"{r['iteration_s']:.2f}", f"{r['networks_s']:.2f}", f"{r['occ_forward_s']:.3f}",
              f"{r['occ_backward_s']:.3f}", f"{100 * r['occ_share']:.0f} %", f"{r['peak_mb']:.0f}",
              f"{r['memory_bank_mb']:.0f}"]])
        device = r["device"].split(":")[0]
        command = " ".join(a for a in sys.argv[1:] if a != "--update-md")
        update_section(f"caml-step-{device}", f"### CAML training iteration ({device})\n\n{stamp()}\n\n"
                       f"Command: `python benchmarks/caml_step.py {command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
