"""semiseg's side of the whole AD-MT update (`benchmarks/official_step_admt.py` runs the official one).

Two cases (`fx["case"]`): `teacher1`, the first update of a teacher-1 stretch (teacher 1 in train mode and
updated, teacher 2 in eval mode, the strong view), and `teacher2_cutmix`, the first update of a teacher-2 stretch
(the CutMix of the weak view with the official boxes `fx["cutmix_boxes"]`, recorded from the official run, and
the permutation drawn by `torch.randperm` after `torch.manual_seed(seed)` on both sides); the official alternation
state is set alike (see the benchmark); seeded student / teacher 1 / teacher 2 weights (seeds s, s+1,
s+2, as the official code gives each network its own initialisation), keyed dropout tagged per network,
`golden_step.ball_batch` for the labelled and weak unlabelled volumes, and one fixed strong view (`strong_view`)
that both sides are fed: the official dataset transform draws it with NumPy, semiseg's `train_step` with torch, so
semiseg's strong-view augmentation is replaced by that tensor here. Update `fx["iteration"]` of the `la-4`
preset, SGD at the learning rate the official step used, then `after_step` (the EMA update of teacher 1).
"""

from __future__ import annotations

from typing import Any

import torch

from golden_step import KeyedDropout, _generator, ball_batch, install_dropout, run_length, sampled, seeded_weights

TAGS = ("student", "teacher1", "teacher2")
STRETCH = 5
"""Length of the current teacher-1 stretch on both sides (the update is its first, so no switch follows)."""


def strong_view(weak: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed colour-jittered, noisy copy of the weak view."""
    g = _generator(seed, "strong")
    noise = torch.randn(weak.shape, generator=g, dtype=torch.float64).to(weak.dtype)
    return 1.2 * weak + 0.1 + 0.1 * noise


def case(size: int, seed: int) -> dict[str, torch.Tensor]:
    """The official loader's batch: unlabelled first (its default `flag_sampling_based_on_lb` False)."""
    x, label = ball_batch(size, seed)
    weak = torch.cat([x[2:], x[:2]])
    strong = torch.cat([strong_view(x[2:], seed), x[:2]])
    return {"image_weak": weak, "image_strong": strong, "label_aug": torch.cat([label[2:], label[:2]])}


def tag_dropout(net: torch.nn.Module, tag: str) -> None:
    for module in net.modules():
        if isinstance(module, KeyedDropout):
            module.keys = [f"{tag}.{key}" for key in module.keys]


def build(fx: dict[str, Any]) -> Any:
    from semiseg.config import build_config
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec

    cfg = build_config("admt", preset="la-4")
    method = get_method("admt")(cfg.method_params(), NetSpec(1, 2, 3, fx["n_filters"]))
    for i, (net, tag) in enumerate(zip((method.net, *method.teachers), TAGS)):
        net.load_state_dict(seeded_weights(net, fx["seed"] + i))
        install_dropout(net, fx["seed"])
        tag_dropout(net, tag)
    method.first_active = fx.get("case", "teacher1") == "teacher1"
    method.counter, method.stretch = 0, STRETCH
    return method, cfg


def box_masks(boxes: list[list[int]], shape: tuple[int, ...]) -> torch.Tensor:
    """[n, *shape] bool masks of the official boxes (x1, y1, z1, x2, y2, z2), sliced as the official CutMix does."""
    masks = torch.zeros(len(boxes), *shape, dtype=torch.bool)
    for mask, (x1, y1, z1, x2, y2, z2) in zip(masks, boxes):
        mask[x1:x2, y1:y2, z1:z2] = True
    return masks


def semiseg_update(fx: dict[str, Any]) -> dict[str, Any]:
    import semiseg.methods.admt as admt
    from semiseg.data.loader import Batch
    from semiseg.engine.schedules import sigmoid_rampup
    from semiseg.engine.trainer import learning_rate
    from semiseg.methods.base import StepContext

    method, cfg = build(fx)
    batch = case(fx["size"], fx["seed"])
    weak, strong = batch["image_weak"][:2], batch["image_strong"][:2]
    x_lab, label_lab = batch["image_weak"][2:], batch["label_aug"][2:]
    method.train()
    ctx = StepContext(fx["iteration"], cfg.iterations)
    jitter, noise, boxes = admt.brightness_contrast, admt.clipped_noise, admt.cutmix_box_masks
    admt.brightness_contrast = lambda x, *a: x
    admt.clipped_noise = lambda x, *a: strong  # the strong view both sides are fed
    admt.cutmix_box_masks = lambda n, shape, device: box_masks(fx["cutmix_boxes"], shape)  # the official boxes
    torch.manual_seed(fx["seed"])  # the CutMix permutation, drawn by both sides with torch.randperm
    try:
        out = method.train_step(Batch(x_lab, label_lab, weak, torch.arange(2)), ctx)
    finally:
        admt.brightness_contrast, admt.clipped_noise, admt.cutmix_box_masks = jitter, noise, boxes
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=fx["lr_at_step"], momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    method.after_step(ctx)
    logs = out.logs
    voxels = weak[:, 0].numel()
    teacher = 0 if fx.get("case", "teacher1") == "teacher1" else 1
    scalars = {"supervised": float(logs["loss/supervised"]), "unlabeled": float(logs["loss/unlabeled"]),
               "weight": float(logs["weight/consistency"]), "loss": float(out.loss.detach()),
               "confident": round(float(logs["pseudo/confident_fraction"]) * voxels),
               "conflict": round(float(logs["pseudo/conflict_fraction"]) * voxels),
               "teacher1_active_after": float(method.first_active), "stretch_counter_after": float(method.counter),
               "teacher_bn_norm": float(torch.cat([b.double().flatten() for n, b in method.teachers[teacher]
                                                   .named_buffers() if "running" in n]).norm())}
    total, p = cfg.iterations, method.params
    if fx.get("case") == "teacher2_cutmix":  # the ramp and the schedules are checked once, in admt.json
        return {"grads": grads, "scalars": scalars, "ramp": [], "schedules": {},
                "student": {k: v.detach() for k, v in method.net.named_parameters()},
                "teacher": {k: v.detach() for k, v in method.teachers[teacher].named_parameters()}}
    lr = [learning_rate(cfg, t) for t in range(1, total + 1)]
    ramp = [p.consistency * sigmoid_rampup(t - 1, p.consistency_rampup, p.epoch_iterations)
            for t in range(1, total + 1)]
    return {"method": method, "grads": grads, "scalars": scalars,
            "student": {k: v.detach() for k, v in method.net.named_parameters()},
            "teacher": {k: v.detach() for k, v in method.teachers[teacher].named_parameters()},
            "ramp": run_length(ramp) if fx.get("ramp_encoding") == "run length" else ramp,
            "schedules": {"learning rate": lr, "learning rate (updates 1-5, then every 10th)": sampled(lr)}}
