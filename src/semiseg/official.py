"""Official checkpoints onto semiseg's networks: the key mapping, one table per method.

Every method's network has the official layout (same modules, same order, same shapes); only the names
differ. This module renames the keys of a `state_dict` saved by the authors' training script
(`torch.save(model.state_dict(), ...)`, or a dict holding it under `net` / `model` / `state_dict`, with or
without DDP's `module.` prefix) so that it loads into the semiseg network that a method trains:

| method | official repository | official network | semiseg module |
|---|---|---|---|
| caml | Herschel555/CAML | `networks.VNet.CAML3d_v1` | `method.net` (`CAMLNet`) |
| mlrpl | Jiawei0o0/mutual-learning-with-reliable-pseudo-labels | `networks.VNet.MCNet3d_v1` | `method.net` |
| crossmatch (3D) | AiEson/CrossMatch | `LA/code/networks/vnet.VNet` | `method.net.net` |
| crossmatch (2D) | AiEson/CrossMatch | `ACDC/model/unet.UNet` | `method.net.net` |
| mcnet | ycwu1997/MC-Net | `networks.VNet.MCNet3d_v1` | `method.net` |
| mcnet_plus | ycwu1997/MC-Net | `networks.VNet.MCNet3d_v2` | `method.net` |
| bcp | DeepMed-Lab-ECNU/BCP | `networks.VNet.VNet` | `method.net` |
| mean_teacher, uamt | HiLab-git/SSL4MIS | `networks.vnet.VNet` | `method.net` |
| cps (3D / 2D) | HiLab-git/SSL4MIS | `networks.vnet.VNet` / `networks.unet.UNet` (`model1`) | `method.net1` |
| unimatch (2D) | LiheYoung/UniMatch | `more-scenarios/medical/model/unet.UNet` | `method.net.net` |
| dtc | HiLab-git/DTC | `networks.vnet_sdf.VNet` (`n_classes=1`) | `method.net` (`SDFVNet`) |
| ssnet | ycwu1997/SS-Net | `networks.VNet.VNet` | `method.net` |
| admt | ZhenZHAO/AD-MT | `networks.vnet.VNet` | `method.net` (both teachers copy it) |

Renaming rules. VNet family: `block_X.conv.i` -> `block_X.i`, `block_X_dw.conv.i` -> `down_X.i`,
`block_X_up.conv.i` -> `up_X.i`; the official `encoder` / `decoderK` become `encoder` / `decoders.K-1`
(single-decoder nets: `decoder`); a flat VNet (SSL4MIS, CrossMatch LA) puts blocks one-five and the `_dw`
blocks under `encoder.`, the rest under `decoder.`. CAML: `encoder1`/`decoder1` -> `f_v.encoder`/`f_v.decoder`,
`encoder2`/`decoder2` -> `f_a.*`, `{intra,inter}_attention.encoder_layers` -> `x4_transform.{intra,inter}_sample`,
`projection_head1` / `prediction_head1` (Sequential 0, 1, 3) -> `projection_v` / `prediction_v` (`fc1`, `bn`,
`fc2`), heads 2 -> `*_a`. 2D UNet: `conv_conv.` is dropped, `encoder.downN.maxpool_conv` -> `encoder.downs.N-1`,
`decoder.upN` -> `decoder.ups.N-1`. DTC (flat VNet with two 1x1 heads on x9): the flat rule under `vnet.`,
except `out_conv` (the tanh level-set head) -> `sdf_head` and `out_conv2` (the segmentation) ->
`vnet.decoder.out_conv`. Official modules that no semiseg loss uses (BCP's projection heads and
contrastive class selectors, SS-Net's likewise: semiseg keeps them on the method, outside the evaluated
network) are dropped, and named in `OfficialLayout.ignored`.

URPC has no entry: its official network (SSL4MIS `unet_3D_dv_semi`) is a 3D UNet with no semiseg counterpart
(semiseg's URPC pyramid is on the VNet; docs/methods/urpc.md); UniMatch has no official 3D network.

The official code has no licence for CAML, MLRPL, UA-MT and AD-MT: nothing of it is here, only the key names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .methods.base import Method

_ENCODER_BLOCKS = ("block_one", "block_two", "block_three", "block_four", "block_five")


@dataclass(frozen=True)
class OfficialLayout:
    """Where a method's official network comes from and how its keys map onto semiseg's."""

    repo: str
    network: str
    """Official module path and class, relative to the repository's code folder."""
    family: str
    """`vnet` (encoder / decoderK children), `vnet_flat` (blocks at the top level), `dtc` (flat, two heads), `caml`
    or `unet2d`."""
    target: str
    """Attribute path, inside the semiseg method, of the module that receives the weights."""
    ignored: tuple[str, ...] = ()
    """Official key prefixes with no semiseg counterpart (unused by every loss), dropped on load."""


LAYOUTS: dict[tuple[str, int], OfficialLayout] = {
    ("caml", 3): OfficialLayout("Herschel555/CAML", "code/networks/VNet.py:CAML3d_v1", "caml", "net"),
    ("mlrpl", 3): OfficialLayout("Jiawei0o0/mutual-learning-with-reliable-pseudo-labels",
                                 "code/networks/VNet.py:MCNet3d_v1", "vnet", "net"),
    ("crossmatch", 3): OfficialLayout("AiEson/CrossMatch", "LA/code/networks/vnet.py:VNet", "vnet_flat", "net.net"),
    ("crossmatch", 2): OfficialLayout("AiEson/CrossMatch", "ACDC/model/unet.py:UNet", "unet2d", "net.net"),
    ("mcnet", 3): OfficialLayout("ycwu1997/MC-Net", "code/networks/VNet.py:MCNet3d_v1", "vnet", "net"),
    ("mcnet_plus", 3): OfficialLayout("ycwu1997/MC-Net", "code/networks/VNet.py:MCNet3d_v2", "vnet", "net"),
    ("bcp", 3): OfficialLayout("DeepMed-Lab-ECNU/BCP", "code/networks/VNet.py:VNet", "vnet", "net",
                               ("projection_head.", "prediction_head.", "contrastive_class_selector")),
    ("mean_teacher", 3): OfficialLayout("HiLab-git/SSL4MIS", "code/networks/vnet.py:VNet", "vnet_flat", "net"),
    ("uamt", 3): OfficialLayout("HiLab-git/SSL4MIS", "code/networks/vnet.py:VNet", "vnet_flat", "net"),
    ("cps", 3): OfficialLayout("HiLab-git/SSL4MIS", "code/networks/vnet.py:VNet", "vnet_flat", "net1"),
    ("cps", 2): OfficialLayout("HiLab-git/SSL4MIS", "code/networks/unet.py:UNet", "unet2d", "net1"),
    ("unimatch", 2): OfficialLayout("LiheYoung/UniMatch", "more-scenarios/medical/model/unet.py:UNet", "unet2d",
                                    "net.net"),
    ("dtc", 3): OfficialLayout("HiLab-git/DTC", "code/networks/vnet_sdf.py:VNet", "dtc", "net"),
    ("ssnet", 3): OfficialLayout("ycwu1997/SS-Net", "code/networks/VNet.py:VNet", "vnet", "net",
                                 ("projection_head.", "prediction_head.", "contrastive_class_selector")),
    ("admt", 3): OfficialLayout("ZhenZHAO/AD-MT", "code/networks/vnet.py:VNet", "vnet_flat", "net"),
}


def official_layout(method: str, spatial_dims: int) -> OfficialLayout:
    try:
        return LAYOUTS[(method, spatial_dims)]
    except KeyError:
        known = ", ".join(f"{m} ({d}D)" for m, d in LAYOUTS)
        raise ConfigError(f"--method {method}: no official {spatial_dims}D network is mapped; official "
                          f"checkpoints load for {known}") from None


def _vnet_blocks(key: str) -> str:
    """Official VNet block names -> semiseg's (`block_X.conv.` / `block_X_dw.conv.` / `block_X_up.conv.`)."""
    key = re.sub(r"block_(\w+?)_dw\.conv\.", r"down_\1.", key)
    key = re.sub(r"block_(\w+?)_up\.conv\.", r"up_\1.", key)
    return re.sub(r"(block_\w+?)\.conv\.", r"\1.", key)


def _map_vnet(key: str) -> str:
    head, _, rest = key.partition(".")
    if head == "encoder":
        return "encoder." + _vnet_blocks(rest)
    match = re.fullmatch(r"decoder(\d*)", head)
    if match is None:
        raise KeyError(key)
    prefix = f"decoders.{int(match.group(1)) - 1}." if match.group(1) else "decoder."
    return prefix + _vnet_blocks(rest)


def _map_vnet_flat(key: str) -> str:
    block = key.split(".", 1)[0]
    encoder = block in _ENCODER_BLOCKS or block.endswith("_dw") or block == "dropout"
    return ("encoder." if encoder else "decoder.") + _vnet_blocks(key)


_DTC_HEADS = {"out_conv": "sdf_head", "out_conv2": "vnet.decoder.out_conv"}


def _map_dtc(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{_DTC_HEADS[head]}.{rest}" if head in _DTC_HEADS else "vnet." + _map_vnet_flat(key)


_CAML_HEADS = {"projection_head1": "projection_v", "prediction_head1": "prediction_v",
               "projection_head2": "projection_a", "prediction_head2": "prediction_a"}
_HEAD_LAYERS = {"0": "fc1", "1": "bn", "3": "fc2"}


def _map_caml(key: str) -> str:
    head, _, rest = key.partition(".")
    if head in _CAML_HEADS:
        layer, _, name = rest.partition(".")
        return f"{_CAML_HEADS[head]}.{_HEAD_LAYERS[layer]}.{name}"
    net = {"encoder1": "f_v.encoder", "decoder1": "f_v.decoder", "encoder2": "f_a.encoder",
           "decoder2": "f_a.decoder"}[head]
    rest = re.sub(r"^(intra|inter)_attention\.encoder_layers\.", r"x4_transform.\1_sample.", rest)
    return f"{net}.{_vnet_blocks(rest)}"


def _map_unet2d(key: str) -> str:
    key = key.replace("conv_conv.", "")
    key = re.sub(r"^encoder\.down(\d)\.maxpool_conv\.", lambda m: f"encoder.downs.{int(m.group(1)) - 1}.", key)
    return re.sub(r"^decoder\.up(\d)\.", lambda m: f"decoder.ups.{int(m.group(1)) - 1}.", key)


def key_map(official_keys: list[str], method: str, spatial_dims: int) -> dict[str, str]:
    """Official key -> semiseg key (relative to `OfficialLayout.target`), ignored keys left out."""
    layout = official_layout(method, spatial_dims)
    keys = [k for k in official_keys if not k.startswith(layout.ignored)] if layout.ignored else list(official_keys)
    mapping = {}
    for key in keys:
        try:
            if layout.family == "caml":
                mapping[key] = _map_caml(key)
            elif layout.family == "vnet":
                mapping[key] = _map_vnet(key)
            elif layout.family == "vnet_flat":
                mapping[key] = _map_vnet_flat(key)
            elif layout.family == "dtc":
                mapping[key] = _map_dtc(key)
            else:
                mapping[key] = _map_unet2d(key)
        except (KeyError, IndexError):
            raise CheckpointError(f"official key {key!r} is not part of {layout.network} ({layout.repo}); "
                                  f"is this a {method} checkpoint?") from None
    return mapping


def unwrap_state_dict(payload: object, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an official checkpoint: a bare state_dict or one under net / model / state_dict;
    DDP's `module.` prefix removed."""
    if isinstance(payload, Mapping):
        for wrapper in ("net", "model", "state_dict"):
            if isinstance(payload.get(wrapper), Mapping):
                payload = payload[wrapper]
                break
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise CheckpointError(f"{source}: not an official state_dict (expected the tensors saved by "
                              "torch.save(model.state_dict(), ...))")
    return {k.removeprefix("module."): v for k, v in payload.items()}


def map_official_state(state: Mapping[str, torch.Tensor], method: str, spatial_dims: int,
                       target: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename `state` into the keys of `target` (semiseg's state_dict); every key and shape must match."""
    mapping = key_map(list(state), method, spatial_dims)
    mapped = {mapping[k]: v for k, v in state.items() if k in mapping}
    missing = [k for k in target if k not in mapped]
    extra = [k for k in mapped if k not in target]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{source}: does not fit semiseg's {method} network ({what}, {len(missing)} missing, "
                              f"{len(extra)} unexpected keys); check --method and --set n_filters=...")
    for key, value in mapped.items():
        if value.shape != target[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, semiseg's network "
                                  f"{tuple(target[key].shape)}; pass the official --set n_filters=... and the "
                                  "dataset's class count")
    return mapped


def to_official_state(state: Mapping[str, torch.Tensor], official_keys: list[str], method: str,
                      spatial_dims: int, source: str = "semiseg network") -> dict[str, torch.Tensor]:
    """The inverse of `map_official_state`: semiseg's `state` (of `OfficialLayout.target`) under the official keys,
    so that the official code can load semiseg's weights (e.g. its test script, run beside `semiseg evaluate`).

    `official_keys` are the official network's `state_dict` keys (they name what the official file holds); every
    one must map to a distinct key of `state` and every key of `state` must be used."""
    mapping = key_map(official_keys, method, spatial_dims)
    unmapped = [k for k in official_keys if k not in mapping]
    if unmapped:
        raise CheckpointError(f"{source}: official keys {unmapped[:3]} have no semiseg counterpart "
                              f"({len(unmapped)} in all); the official file would miss them")
    if len(set(mapping.values())) != len(mapping):
        raise CheckpointError(f"{source}: two official keys map to one semiseg key; the mapping is not invertible")
    missing = [k for k in mapping.values() if k not in state]
    extra = [k for k in state if k not in set(mapping.values())]
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unused {extra[:3]}"
        raise CheckpointError(f"{source}: does not fit the official {method} network ({what}, {len(missing)} "
                              f"missing, {len(extra)} unused keys)")
    return {official: state[ours] for official, ours in mapping.items()}


def target_module(method: Method) -> torch.nn.Module:
    layout = official_layout(method.name, method.spec.spatial_dims)
    module: torch.nn.Module = method
    for attribute in layout.target.split("."):
        module = getattr(module, attribute)
    return module


def official_file(path: Path) -> Path:
    """`path`, checked to be a file (before any output is written)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: official checkpoint not found")
    return path


def load_official_checkpoint(path: Path, method: Method) -> None:
    """Load an official training script's checkpoint into `method` (its EMA teacher or teachers, if any, copy it:
    the evaluated network holds the file's weights whichever one the method evaluates)."""
    path = official_file(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many exception types for damaged or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}); expected a .pth written by "
                              "torch.save(model.state_dict(), ...)") from None
    module = target_module(method)
    target = module.state_dict()
    mapped = map_official_state(unwrap_state_dict(payload, str(path)), method.name, method.spec.spatial_dims,
                                target, str(path))
    module.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()})
    teacher = getattr(method, "teacher", None)
    if teacher is not None and hasattr(teacher, "copy_from"):
        teacher.copy_from(module)
    for copy in getattr(method, "teachers", ()):  # AD-MT's two EMA teachers (teacher 1 is evaluated)
        copy.load_state_dict(module.state_dict())
