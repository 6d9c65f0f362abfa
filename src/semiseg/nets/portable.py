"""Inference networks as data: an architecture name and its constructor arguments.

A model file (`semiseg export`) stores this description beside the weights, so that loading it rebuilds the
network from `semiseg.nets` alone, without the method that trained it. A multi-decoder VNet evaluated through
decoder 1 (MC-Net, MLRPL) is stored as the plain VNet that path is: its other decoders never reach the file.
A network this module does not know (a new method's own module) is described by its method instead, and then
needs that method's code to load.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .unet2d import UNet2D
from .vnet import DecoderAverage, MultiDecoderVNet, VNet

Architecture = dict[str, Any]  # {"arch": name, "args": {...}}; JSON-like, safe for torch.load(weights_only=True)


def describe(net: nn.Module) -> tuple[Architecture, dict[str, str]] | None:
    """(architecture, map from each weight name of the rebuilt network to its name in `net.state_dict()`),

    or None when the network's class is not one of the portable architectures. Exact classes only: a subclass
    may add layers that the description would lose.
    """
    names = list(net.state_dict())
    if type(net) is VNet and net.arch_args is not None:
        return {"arch": "vnet", "args": dict(net.arch_args)}, {k: k for k in names}
    if type(net) is UNet2D:
        return {"arch": "unet2d", "args": dict(net.arch_args)}, {k: k for k in names}
    if type(net) is MultiDecoderVNet:  # forward = decoder 1 on the shared encoder: a plain VNet
        args = {k: v for k, v in net.arch_args.items() if k != "up_types"}
        keys = {k: k for k in names if k.startswith("encoder.")}
        keys.update({"decoder." + k.removeprefix("decoders.0."): k for k in names if k.startswith("decoders.0.")})
        return {"arch": "vnet", "args": {**args, "up": net.arch_args["up_types"][0]}}, keys
    if type(net) is DecoderAverage and type(net.net) is MultiDecoderVNet:
        return {"arch": "decoder_average", "args": {"net": dict(net.net.arch_args), "mode": net.mode}}, \
            {k: k for k in names}
    return None


def build(arch: Architecture) -> nn.Module:
    """The network an architecture describes (randomly initialised: load the weights next)."""
    name, args = arch.get("arch"), dict(arch.get("args") or {})
    if name == "vnet":
        return VNet(**args)
    if name == "unet2d":
        return UNet2D(**args)
    if name == "decoder_average":
        return DecoderAverage(MultiDecoderVNet(**args["net"]), args["mode"])
    raise ValueError(f"unknown portable architecture {name!r}")


def is_portable(arch: Architecture) -> bool:
    return arch.get("arch") in ("vnet", "unet2d", "decoder_average")
