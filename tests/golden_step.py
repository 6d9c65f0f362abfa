"""The network step that `benchmarks/official_equivalence.py` runs on both codes and `test_golden.py` reruns.

Everything here is defined by seeds alone (weights, inputs, dropout masks), so a fixture holds numbers only:
the official code's values of every term, never its weights or its code.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def default_dtype(name: str) -> Iterator[None]:
    """Both codes built and run in `name` (the fixtures use float64: the comparison then holds to about 1e-12
    whatever the thread count or the CPU's kernels, where float32 rounding noise alone reaches 1e-5 relative in
    the gradient of a bias followed by BatchNorm)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, parts)).encode()))


class KeyedDropout(nn.Module):
    """Dropout whose mask is a function of (seed, semiseg module name, call number): both codes drop the same
    channels (Dropout2d / Dropout3d) or elements (Dropout) whatever order they run their modules in."""

    def __init__(self, p: float, keys: list[str], seed: int, channelwise: bool = True) -> None:
        super().__init__()
        self.p, self.keys, self.seed, self.channelwise = p, keys, seed, channelwise
        self.calls: dict[str, int] = {}
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self.keys[self.n % len(self.keys)]  # a module called k times per forward cycles its k keys
        self.n += 1
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        if not self.training or self.p == 0:
            return x
        shape = (*x.shape[:2], *[1] * (x.ndim - 2)) if self.channelwise else x.shape
        keep = torch.rand(shape, generator=_generator(self.seed, key, count)) >= self.p
        return x * (keep.to(x.dtype) / (1 - self.p))


def key_of_official_module(name: str, method: str, dims: int) -> str:
    """semiseg's module path for an official module path (through the parameter-key mapping)."""
    from semiseg.official import key_map

    return key_map([f"{name}.weight"], method, dims)[f"{name}.weight"].removesuffix(".weight")


def install_dropout(module: nn.Module, seed: int) -> None:
    """Replace semiseg's dropout modules by `KeyedDropout` keyed by their own path; attention dropout off."""
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
                full = f"{name}.{child_name}" if name else child_name
                setattr(parent, child_name, KeyedDropout(child.p, [full], seed, not isinstance(child, nn.Dropout)))
        if isinstance(parent, nn.MultiheadAttention):
            parent.dropout = 0.0


def build_semiseg(method_name: str, dims: int, n_filters: int, classes: int) -> tuple[Any, nn.Module]:
    """The semiseg method and the module the official weights map onto."""
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec
    from semiseg.official import target_module

    cls = get_method(method_name)
    method = cls(cls.Params(), NetSpec(1, classes, dims, n_filters))
    return method, target_module(method)


def seeded_weights(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """One deterministic draw of every float tensor of `module`'s state, key by key."""
    out = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        g = _generator(seed, key)
        noise = torch.randn(value.shape, generator=g, dtype=torch.float64)
        if key.endswith("running_var"):
            w = 1 + 0.2 * torch.rand(value.shape, generator=g, dtype=torch.float64)
        elif key.endswith("running_mean") or key.endswith("bias"):
            w = 0.1 * noise
        elif value.ndim == 1:
            w = 1 + 0.1 * noise
        else:
            w = noise / value[0].numel() ** 0.5
        out[key] = w.to(value.dtype)
    return out


def inputs(dims: int, size: int, batch: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(seed, "inputs")
    shape = (size,) * dims
    x = torch.randn(batch, 1, *shape, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
    label = torch.randint(0, classes, (batch, *shape), generator=g)
    return x, label


def semiseg_outputs(method: str) -> Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]:
    def run(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        if method == "caml":
            return list(net(x))
        if method in ("mlrpl", "mcnet", "mcnet_plus"):
            return [logits for logits, _ in net.forward_all(x)]
        if method == "dtc":  # the official order: (tanh level set, segmentation logit)
            logit, sdf = net.forward_both(x)
            return [sdf, logit]
        return [net(x)]
    return run


def network_step(net: nn.Module, outputs: Callable | None, x: torch.Tensor, label: torch.Tensor, seed: int,
                 dropout: bool, method: str = "") -> dict[str, Any]:
    """Train-mode forward, the fixed loss, backward, one SGD step; every tensor the comparison needs."""
    if dropout:
        install_dropout(net, seed)
    outputs = outputs or semiseg_outputs(method)
    checksums = {"weights": float(sum(v.double().sum() for v in net.state_dict().values()
                                      if v.is_floating_point())),
                 "inputs": float(x.double().sum()), "labels": int(label.sum())}
    net.train()
    net.zero_grad(set_to_none=True)
    outs = outputs(net, x)
    classes = int(label.max()) + 1
    loss = sum(F.cross_entropy(o, label) if o.shape[1] >= classes else o.square().mean() for o in outs)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters() if p.grad is not None}
    buffers = {k: v.detach().clone() for k, v in net.named_buffers() if "running" in k}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.grad is not None], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    optimizer.step()
    after = {k: p.detach().clone() for k, p in net.named_parameters() if k in grads}
    return {"outputs": [o.detach() for o in outs], "loss": loss.detach(), "grads": grads, "after": after,
            "buffers": buffers, "checksums": checksums}


def ball_batch(size: int, seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 1, S, S, S] and one foreground ball per volume [n, S, S, S] (int64)."""
    x, _ = inputs(3, size, n, 2, seed)
    g = _generator(seed, "balls")
    centre = size * (0.3 + 0.4 * torch.rand(n, 3, generator=g, dtype=torch.float64))
    radius = size * (0.15 + 0.15 * torch.rand(n, generator=g, dtype=torch.float64))
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * 3, indexing="ij"))
    dist = ((grid.unsqueeze(0) - centre.view(n, 3, 1, 1, 1)) ** 2).sum(1).sqrt()
    return x, (dist < radius.view(n, 1, 1, 1)).long()


def run_length(values: list[float]) -> list[float]:
    """[v1, n1, v2, n2, ...]: a per-update schedule in a fixture without one number per update (a step or
    ramp schedule over 15,000 updates has a few dozen distinct values)."""
    out: list[float] = []
    for v in values:
        if out and out[-2] == v:
            out[-1] += 1
        else:
            out += [v, 1]
    return out


def sampled(values: list[float]) -> list[float]:
    """Updates 1-5, then every 10th (10, 20, ...): a smooth per-update schedule (poly) in a fixture; a lag of one
    update shows at every sample."""
    return values[:5] + values[9::10]


def summarize_output(t: torch.Tensor, n: int = 64) -> dict[str, Any]:
    """Shape, sums, max |.| and `n` values at fixed positions: enough to pin an output down, small to store."""
    flat = t.detach().double().flatten()
    index = torch.linspace(0, flat.numel() - 1, n).round().long()
    return {"shape": list(t.shape), "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
            "max_abs": flat.abs().max().item(), "samples": flat[index].tolist()}


def mean_teacher_step(n_filters: int, size: int, seed: int, iteration: int, name: str = "mean_teacher",
                      total: int = 6000) -> dict[str, Any]:
    """semiseg's whole Mean Teacher (or UA-MT) update with the SSL4MIS script's defaults (consistency 0.1,
    ramp-up 200 epochs; UA-MT: `total` = its max_iterations for the threshold ramp), seeded student and teacher,
    keyed dropout (`student.` / `teacher.` keys), noise from `torch.manual_seed(seed)`; SGD lr 0.01, momentum
    0.9, weight decay 1e-4, then the EMA update."""
    from semiseg.data.loader import Batch
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec, StepContext

    cls = get_method(name)
    method = cls(cls.Params(consistency=0.1, consistency_rampup=200.0), NetSpec(1, 2, 3, n_filters))
    for net, tag, s in ((method.net, "student", seed), (method.teacher.net, "teacher", seed + 1)):
        net.load_state_dict(seeded_weights(net, s))
        install_dropout(net, seed)
        for module in net.modules():
            if isinstance(module, KeyedDropout):
                module.keys = [f"{tag}.{key}" for key in module.keys]
    x, label = inputs(3, size, 4, 2, seed)
    method.train()
    torch.manual_seed(seed)
    ctx = StepContext(iteration, total)
    out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    method.after_step(ctx)
    logs = out.logs
    scalars = {"supervised": float(logs["loss/supervised"]), "weight": float(logs["weight/consistency"]),
               "consistency": float(logs["loss/consistency"]), "loss": float(out.loss.detach())}
    if name == "uamt":
        scalars.update(threshold=float(logs["uncertainty/threshold"]),
                       certain_fraction=float(logs["uncertainty/certain_fraction"]))
    return {"method": method, "x": x, "label": label[:2], "grads": grads, "scalars": scalars,
            "student": {k: p.detach() for k, p in method.net.named_parameters()},
            "teacher": {k: p.detach() for k, p in method.teacher.net.named_parameters()},
            "ramp": [method.consistency_weight(StepContext(t, total)) for t in range(1, 6001)]}


def mcnet_step(method_name: str, n_filters: int, size: int, seed: int, iteration: int) -> dict[str, Any]:
    """semiseg's whole MC-Net / MC-Net+ update (official defaults: lamda 0.5, consistency 1, ramp-up 40,
    T 0.1) on seeded weights with keyed dropout; SGD lr 0.01, momentum 0.9, weight decay 1e-4."""
    from semiseg.data.loader import Batch
    from semiseg.methods import get_method
    from semiseg.methods.base import NetSpec, StepContext

    cls = get_method(method_name)
    method = cls(cls.Params(), NetSpec(1, 2, 3, n_filters))
    method.net.load_state_dict(seeded_weights(method.net, seed))
    install_dropout(method.net, seed)
    x, label = inputs(3, size, 4, 2, seed)
    method.train()
    ctx = StepContext(iteration, 15000)
    out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), ctx)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    optimizer.zero_grad()
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in method.net.named_parameters()}
    optimizer.step()
    p = method.params
    from semiseg.engine.schedules import sigmoid_rampup

    return {"method": method, "x": x, "label": label[:2], "grads": grads,
            "scalars": {"dice": float(out.logs["loss/dice"]), "consistency": float(out.logs["loss/consistency"]),
                        "weight": float(out.logs["weight/consistency"]), "loss": float(out.loss.detach())},
            "student": {k: v.detach() for k, v in method.net.named_parameters()},
            "ramp": [p.consistency * sigmoid_rampup(t, p.consistency_rampup, p.epoch_iterations)
                     for t in range(1, 15001)]}
