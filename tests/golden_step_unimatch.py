"""semiseg's side of `benchmarks/official_step_unimatch.py`: one whole 2D UniMatch update (ACDC recipe).

The `acdc-3` preset gives every hyper-parameter. Aligned with the official side by construction:
- weights: `seeded_weights(seed)` with the output convolution's weights x `SHARPEN`, so that about half of the
  unlabelled pixels pass tau = 0.95 (with plain seeded weights none does, and the masked terms would be empty);
- inputs: 2 labelled images (`inputs`), u_w and the mix batch (2 + 2) at 8-bit levels (the official PIL images;
  semiseg's `quantise_8bit` leaves them unchanged);
- strong views and CutMix boxes: drawn once by semiseg's own `strong_views` / `cutmix_boxes` under
  `torch.manual_seed(seed)` (the first seed from `seed` on whose boxes both strong views get at least one box),
  then fed to both sides (the official loop receives them from its loader);
- dropout: the encoder's `nn.Dropout` keyed by module name; the feature perturbation (`perturb_features`, the
  official `nn.Dropout2d(0.5)` built inside `forward(x, need_fp=True)`) by one shared key "fp", level by level.
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import KeyedDropout, inputs, install_dropout, seeded_weights

SHARPEN = 10.0
SCHEDULE_EVERY = 10
"""The fixture stores the learning rate at updates 1, 11, 21, ...; the benchmark's table compares every one."""
CLASSES = 4


def fp_dropout(seed: int) -> KeyedDropout:
    """The feature perturbation's channel dropout, one key for the five levels in order (0.5, always on)."""
    return KeyedDropout(0.5, ["fp"], seed, channelwise=True)


def build(fx: dict[str, Any]) -> tuple[Any, Any]:
    from semiseg.config import build_config
    from semiseg.engine.trainer import build_method
    from semiseg.methods.base import NetSpec

    cfg = build_config("unimatch", None, {"device": "cpu"}, "acdc-3")
    method = build_method(cfg, NetSpec(1, CLASSES, 2, cfg.n_filters), torch.device("cpu"))
    weights = seeded_weights(method.net.net, fx["seed"])
    weights["decoder.out_conv.weight"] = weights["decoder.out_conv.weight"] * SHARPEN
    method.net.net.load_state_dict(weights)
    install_dropout(method.net.net, fx["seed"])
    return cfg, method


def batch_tensors(method: Any, fx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """x, y, u (u_w then the mix batch), the four strong views and the two box sets."""
    from semiseg.methods._augment import quantise_8bit

    seed, size = fx["seed"], fx["size"]
    x, y = inputs(2, size, 2, CLASSES, seed)
    g = torch.Generator().manual_seed(seed)
    u = quantise_8bit(torch.rand(4, 1, size, size, generator=g, dtype=torch.float64)).to(x.dtype)
    assert torch.equal(quantise_8bit(u), u), "u must lie on the 8-bit levels"
    u_w, u_mix = u[:2], u[2:]
    for draw in range(seed, seed + 100):
        torch.manual_seed(draw)
        views = method.strong_views(torch.cat([u_w, u_w, u_mix, u_mix])).to(x.dtype)
        boxes = method.cutmix_boxes(4, (size, size), torch.device("cpu"))
        if boxes[:2].sum() > 0 and boxes[2:].sum() > 0:
            break
    s1, s2, s1_mix, s2_mix = views.split(2)
    return {"x": x, "y": y, "u": u, "s1": s1, "s2": s2, "s1_mix": s1_mix, "s2_mix": s2_mix,
            "box1": boxes[:2], "box2": boxes[2:], "views": views, "boxes": boxes}


def semiseg_update(fx: dict[str, Any], every: int | None = None) -> dict[str, Any]:
    from semiseg.data.loader import Batch
    from semiseg.engine.trainer import build_optimizer, learning_rate
    from semiseg.methods.base import StepContext
    from semiseg.nets import perturbed

    every = fx.get("schedule_every", SCHEDULE_EVERY) if every is None else every
    k, seed = fx["iteration"], fx["seed"]
    cfg, method = build(fx)
    t = batch_tensors(method, fx)
    method.strong_views = lambda images: t["views"]
    method.cutmix_boxes = lambda n, size, device: t["boxes"]
    valid: list[torch.Tensor | None] = []
    dice = method.dice

    def recording_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        valid.append(mask)
        return dice(logits, target, mask)

    method.dice = recording_dice
    keyed = fp_dropout(seed)
    real = perturbed.perturb_features
    perturbed.perturb_features = lambda feature, rate, kind="dropout": keyed(feature)
    method.train()
    ctx = StepContext(k, cfg.iterations)
    try:
        out = method.train_step(Batch(t["x"], t["y"], t["u"], torch.arange(2)), ctx)
    finally:
        perturbed.perturb_features = real
    optimizer = build_optimizer(cfg, method)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, k)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.net.net.named_parameters()}
    optimizer.step()
    method.after_step(ctx)
    logs = out.logs
    _, mask_s1, mask_s2, mask_fp = valid  # supervised Dice (no mask), then s1, s2, fp
    updates = range(1, cfg.iterations + 1, every)
    return {"method": method, "tensors": t, "grads": grads, "batch": 6, "iterations": cfg.iterations,
            "scalars": {"loss_x": float(logs["loss/x"]), "loss_s1": float(logs["loss/s1"]),
                        "loss_s2": float(logs["loss/s2"]), "loss_fp": float(logs["loss/fp"]),
                        "loss": float(out.loss.detach()), "lr": learning_rate(cfg, k),
                        "mask_ratio": float(logs["confident_fraction"]),
                        "valid_s1": float(mask_s1.sum()), "valid_s2": float(mask_s2.sum()),
                        "valid_fp": float(mask_fp.sum()), "box1": float(t["box1"].sum()),
                        "box2": float(t["box2"].sum())},
            "student": {n: v.detach() for n, v in method.net.net.named_parameters()},
            "ramp": [], "schedules": {"learning rate": [learning_rate(cfg, u) for u in updates]}}
