"""Sliding-window inference exactly as the LA-lineage test scripts do it (protocol.md section 1.4).

Zero-pad axes smaller than the patch (left = floor(pad / 2)), windows at min(k * stride, L - p),
average the *softmax probabilities* (not logits) with equal weights, argmax, un-pad. Windows are
batched through the network and the score map stays on the network's device.

Two faster CPU paths are options, off by default because they change the numbers at rounding level
(the fp32 default gives the same per-case metrics as ever): bf16 autocast (`cpu_bf16`) and BatchNorm folded
into the preceding convolution (`fold_bn`). Both are fields of the protocol, so the card states them.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .cpu_features import warn_emulated_bf16
from .postprocess import largest_connected_component
from .reductions import class_argmax

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..data import Layout


@dataclass(frozen=True)
class InferenceProtocol:
    """How a volume becomes a label map; recorded verbatim in every protocol card."""

    mode: str = "sliding_window"
    patch_size: tuple[int, ...] = (112, 112, 80)
    stride: tuple[int, ...] = (18, 18, 4)
    post_lcc: bool = False
    sw_batch_size: int = 4
    blend: str = "mean softmax probabilities, equal weights"
    decision: str = "argmax over averaged probabilities (= foreground > 0.5 for 2 classes, ties to background)"
    cpu_bf16: bool = False  # bf16 autocast on CPU as well (CUDA always runs bf16 autocast)
    fold_bn: bool = False  # BatchNorm folded into the convolution before it (inference only)


def inference_protocol(cfg: TrainConfig, layout: Layout | None = None) -> InferenceProtocol:
    """The run's inference protocol: its patch and stride, slice by slice for 2D networks (ACDC)."""
    # Without a layout, a 2D patch means a 2D network applied to volumes slice by slice (ACDC).
    mode = layout.inference_mode if layout is not None else "slicewise" if len(cfg.patch_size) == 2 else \
        "sliding_window"
    if mode == "sliding_window" and len(cfg.stride) != len(cfg.patch_size):
        raise ConfigError(f"stride {cfg.stride} and patch_size {cfg.patch_size} need the same number of axes; "
                          "pass --set stride=... with one value per patch axis")
    return InferenceProtocol(mode, tuple(cfg.patch_size), tuple(cfg.stride), cfg.post_lcc,
                             cpu_bf16=cfg.cpu_bf16, fold_bn=cfg.fold_bn)


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """n = ceil((size - patch) / stride) + 1 starts, the last one clamped to the border."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / stride) + 1
    return [min(k * stride, size - patch) for k in range(n)]


def autocast_for(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA (tensor cores), and on CPU when asked (AVX512-BF16 / AMX); else a no-op context."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    enabled = cpu_bf16 and device.type == "cpu"
    if enabled:
        warn_emulated_bf16()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` in which every BatchNorm that directly follows a convolution inside an
    `nn.Sequential` is folded into that convolution's weight and bias (one pass over the data saved per
    BatchNorm). Equal to the original up to float rounding; `net` itself is left unchanged."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(net).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, _CONV) and isinstance(bn, _BN) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, _TRANSPOSED))
                seq._modules[b] = nn.Identity()
    return folded


@torch.no_grad()
def sliding_window_probs(net: nn.Module, image: torch.Tensor, patch: Sequence[int], stride: Sequence[int],
                         sw_batch_size: int = 4, cpu_bf16: bool = False) -> torch.Tensor:
    """Averaged softmax [K, *spatial] for one image [C, *spatial] (on the network's device)."""
    spatial = image.shape[1:]
    if len(patch) != len(spatial) or len(stride) != len(spatial):
        raise ValueError(f"patch {tuple(patch)} / stride {tuple(stride)} do not match image dims {tuple(spatial)}")
    if any(t > p or t < 1 for t, p in zip(stride, patch)):
        raise ValueError(f"stride {tuple(stride)} must be between 1 and the patch {tuple(patch)} on every axis; "
                         "a larger stride leaves voxels that no window covers")
    totals = [max(p - s, 0) for s, p in zip(spatial, patch, strict=True)]
    pad = [(t // 2, t - t // 2) for t in totals]
    flat_pad = [v for left_right in reversed(pad) for v in left_right]
    padded = F.pad(image, flat_pad) if any(totals) else image
    size = padded.shape[1:]
    starts = [window_starts(L, p, s) for L, p, s in zip(size, patch, stride, strict=True)]
    windows = [tuple(slice(a, a + p) for a, p in zip(corner, patch, strict=True))
               for corner in itertools.product(*starts)]
    score: torch.Tensor | None = None
    count = torch.zeros(size, device=image.device)
    for chunk_start in range(0, len(windows), sw_batch_size):
        chunk = windows[chunk_start:chunk_start + sw_batch_size]
        x = torch.stack([padded[(slice(None), *w)] for w in chunk])
        with autocast_for(image.device, cpu_bf16):
            logits = net(x)
        # A net with `window_scores = True` returns scores to average as they are (MLRPL quirk Q5).
        probs = logits.float() if getattr(net, "window_scores", False) else logits.float().softmax(1)
        if score is None:
            score = torch.zeros((probs.shape[1], *size), device=image.device)
        for w, p in zip(chunk, probs, strict=True):
            score[(slice(None), *w)] += p
            count[w] += 1
    assert score is not None
    probs = score / count
    crop = tuple(slice(left, left + s) for (left, _), s in zip(pad, spatial, strict=True))
    return probs[(slice(None), *crop)]


def predict_volume(net: nn.Module, image: np.ndarray, protocol: InferenceProtocol,
                   device: torch.device) -> np.ndarray:
    """Label map (uint8, *spatial) of one image (C, *spatial), with optional largest-component filter."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    if protocol.fold_bn:
        net = fold_batchnorm(net)
    if protocol.mode == "sliding_window":
        probs = sliding_window_probs(net, tensor, protocol.patch_size, protocol.stride, protocol.sw_batch_size,
                                     protocol.cpu_bf16)
        label = class_argmax(probs, 0).to(torch.uint8).cpu().numpy()
    elif protocol.mode == "slicewise":
        from .slicewise import slicewise_labels

        label = slicewise_labels(net, tensor, protocol.patch_size, cpu_bf16=protocol.cpu_bf16).to(
            torch.uint8).cpu().numpy()
    else:
        raise ValueError(f"unknown inference mode {protocol.mode!r}")
    if protocol.post_lcc:
        filtered = np.zeros_like(label)
        for c in range(1, int(label.max()) + 1):
            filtered[largest_connected_component(label == c)] = c
        label = filtered
    return label
