"""Model files (`model.pt`, `semiseg export`): the inference network and what it takes to use it, nothing else.

A run's checkpoint holds everything an exact resume needs: every network of the method, EMA teachers, memory banks,
optimiser state, RNG states (1.2 GB for CAML, whose evaluated network has 38 MB of weights). A model file holds the
evaluated network's weights, its architecture (`nets.portable`), the network spec, the inference protocol, the
preprocessing and the training record the protocol card cites. It loads with `torch.load(weights_only=True)` and
rebuilds the network from `semiseg.nets` alone.

`load_model` reads either kind. A checkpoint is read memory-mapped and its method is built on the meta device (no
storage), so only the inference network's tensors are ever read and copied: a CAML memory bank, a second network,
heads and optimiser state stay on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..config import TrainConfig
from ..errors import CheckpointError, DataError, SemisegError
from ..methods.base import Method, NetSpec
from ..nets import portable
from . import checkpoint as ckpt
from .inference import InferenceProtocol, inference_protocol

FORMAT = "semiseg-model"
VERSION = 1
MODEL = "model.pt"
# A network that `nets.portable` cannot describe is rebuilt through its method (whose code is then needed).
BY_METHOD = "method"
# Windows per forward pass on CPU: as many as fit in the voxels of CPU_WINDOWS paper-size LA windows (112x112x80),
# so one window at a time at the paper's size, as the official test scripts. Measured with the 16-filter VNet
# (BENCHMARKS.md "cpu-windows"): at 112x112x80, 2 windows per pass were 3 % faster than 1 and 4 were 5 % slower,
# while each extra window holds another 320-360 MiB of activations, which put the evaluation peak above the
# official CAML test script's (section "lean-artifacts"). Smaller windows are batched up to the same voxel count
# (a 64x64x32 window: up to 7, within the protocol's batch). The labels do not depend on it.
CPU_WINDOWS = 1
PAPER_WINDOW_VOXELS = 112 * 112 * 80


def cpu_windows_per_pass(patch: Sequence[int]) -> int:
    """Windows of size `patch` per forward pass on CPU: as many as fit in `CPU_WINDOWS` paper-size windows."""
    return max(1, CPU_WINDOWS * PAPER_WINDOW_VOXELS // math.prod(patch))


@dataclass
class InferenceModel:
    """A network ready for inference, with the record the protocol card is written from."""

    net: nn.Module
    spec: NetSpec
    config: TrainConfig  # the training configuration: dataset, split sizes, seed, recipe
    protocol: InferenceProtocol
    iteration: int
    rule: str  # how the weights were chosen (a key of evaluate.CHECKPOINT_RULES)
    best: dict[str, Any]
    evaluated_output: str
    preprocessing: dict[str, Any]
    source: Path  # the file the weights were read from
    exported_from: str | None = None  # for a model file: the checkpoint it was exported from
    record: dict[str, Any] = field(default_factory=dict)  # the run's window plan, extensions, dataset fingerprint

    def protocol_for(self, device: torch.device, post_lcc: bool | None = None, cpu_bf16: bool | None = None,
                     fold_bn: bool | None = None) -> InferenceProtocol:
        """The protocol as run on `device`: at most `cpu_windows_per_pass` windows per forward on CPU (the labels do
        not depend on it), and the largest-component filter switched as asked (None: as trained)."""
        protocol = self.protocol if post_lcc is None else replace(self.protocol, post_lcc=post_lcc)
        if cpu_bf16 is not None:
            protocol = replace(protocol, cpu_bf16=cpu_bf16)
        if fold_bn is not None:
            protocol = replace(protocol, fold_bn=fold_bn)
        cap = cpu_windows_per_pass(protocol.patch_size)
        if torch.device(device).type == "cpu" and protocol.sw_batch_size > cap:
            protocol = replace(protocol, sw_batch_size=cap)
        return protocol


def recipe_json(data: str) -> dict[str, Any] | None:
    """The training dataset's preprocessing recipe (JSON) when it is a prepared dataset; None for h5 layouts."""
    from ..data.layouts.nnunet import find_prepared
    from ..data.prepare import PREPARED

    if data == "synthetic" or data.startswith("synthetic:"):
        return None
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"{root}: the run's training data is not found from here, and predicting on NIfTI / NRRD "
                        "scans needs its preprocessing; pass --data with the dataset (or its prepared cache)")
    cache = find_prepared(root)
    return None if cache is None else json.loads((cache / PREPARED).read_text())["recipe"]


def read_artifact(path: Path) -> dict[str, Any]:
    """A checkpoint or model file, memory-mapped (tensors are read from disk only when used), validated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found; pass a run folder, a model.pt written by `semiseg export` "
                              "or a checkpoint.pt written by `semiseg train`")
    try:
        with warnings.catch_warnings():  # a damaged file's bytes can look like an unusual pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many exception types for damaged or foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint or model file ({type(exc).__name__}); it is "
                              "truncated or not written by semiseg; export it again, or resume from an earlier "
                              "checkpoint") from None
    kind = payload.get("format") if isinstance(payload, dict) else None
    newest = {FORMAT: VERSION, ckpt.FORMAT: ckpt.VERSION}
    if kind not in newest:
        raise CheckpointError(f"{path}: not a semiseg model or checkpoint (no {FORMAT!r} or {ckpt.FORMAT!r} "
                              "marker); pass a model.pt written by `semiseg export` or a run folder")
    version = payload.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > newest[kind]:
        raise CheckpointError(f"{path}: written by a newer semiseg ({kind} format {version}); upgrade semiseg")
    if version != newest[kind] or isinstance(version, bool):
        raise CheckpointError(f"{path}: {'checkpoint' if kind == ckpt.FORMAT else 'model file'} format version "
                              f"{version!r} is not one this semiseg reads ({newest[kind]}); the file is damaged or "
                              "was not written by semiseg")
    return payload


def _method_on_meta(cfg: TrainConfig, spec: NetSpec) -> Method:
    """The method with every tensor on the meta device: its structure without any storage."""
    with torch.device("meta"):
        return cfg.method_class()(cfg.method_params(), spec)


def _inference_weights(method: Method, state: dict[str, torch.Tensor]
                       ) -> tuple[portable.Architecture, dict[str, torch.Tensor]]:
    """The inference network's architecture and its tensors, picked by name out of the method's state `state`."""
    net = method.inference_network()
    described = portable.describe(net)
    if described is None:
        arch = {"arch": BY_METHOD, "args": {"method": method.name, "params": method.params.model_dump(mode="json"),
                                            "spec": asdict(method.spec)}}
        keys = {k: k for k in net.state_dict()}
    else:
        arch, keys = described
    method_names = {id(t): name for name, t in method.state_dict(keep_vars=True).items()}
    net_tensors = net.state_dict(keep_vars=True)
    return arch, {k: state[method_names[id(net_tensors[src])]] for k, src in keys.items()}


def model_payload(checkpoint: dict[str, Any], source: Path, rule: str) -> dict[str, Any]:
    """The model file of a (memory-mapped) checkpoint payload; its tensors are still the checkpoint's."""
    cfg, spec = ckpt.check_checkpoint(source, checkpoint)
    method = _method_on_meta(cfg, spec)
    arch, weights = _inference_weights(method, checkpoint["method"])
    try:
        recipe, recorded = recipe_json(cfg.data), "the training dataset's prepared recipe"
    except DataError:
        recipe, recorded = None, None  # the data moved since training: predict then asks for --data
    if recipe is None and recorded is not None:
        recorded = "none (images are used as the dataset stores them)"
    return {
        "format": FORMAT, "version": VERSION, "network": arch, "weights": weights, "spec": asdict(spec),
        "inference": asdict(inference_protocol(cfg)),
        "preprocessing": {"data": cfg.data, "layout": cfg.layout, "recipe": recipe, "recipe_recorded": recorded},
        "card": {"method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "config": cfg.model_dump(mode="json"),
                 "iteration": int(checkpoint["iteration"]), "rule": rule, "best": dict(checkpoint.get("best") or {}),
                 "evaluated_output": method.evaluated_output(), "exported_from": str(Path(source).resolve()),
                 "trained_with": checkpoint.get("semiseg_version"), "semiseg_version": __version__,
                 "record": {k: checkpoint.get(k) for k in ("plan", "history", "dataset")},
                 "exported_utc": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}"},
    }


def export_model(checkpoint: Path, out: Path, rule: str) -> Path:
    """Write the model file of `checkpoint` (whose weights `rule` chose) to `out`, atomically."""
    source = read_artifact(checkpoint)
    if source["format"] == FORMAT:
        raise CheckpointError(f"{checkpoint}: already a model file; copy it instead of exporting it")
    payload = model_payload(source, Path(checkpoint), rule)
    payload["weights"] = {k: v.contiguous().clone() for k, v in payload["weights"].items()}
    out = Path(out)
    if out.exists():  # only an earlier model file is ours to replace
        kind = None
        if out.is_file():
            with contextlib.suppress(CheckpointError):
                kind = read_artifact(out)["format"]
        if kind != FORMAT:
            raise CheckpointError(f"{out}: exists and is not a semiseg model file; choose another --out (export "
                                  "replaces only an earlier model file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # save_checkpoint's atomic write; the payload's own format marker replaces the checkpoint's.
    ckpt.save_checkpoint(out, payload)
    return out


def _build_network(arch: portable.Architecture) -> nn.Module:
    """The described network on the meta device (structure only; the weights are assigned next)."""
    with torch.device("meta"):
        if arch.get("arch") == BY_METHOD:
            args = arch["args"]
            cfg = TrainConfig(method=args["method"], params=args["params"])
            return _method_on_meta(cfg, NetSpec(**args["spec"])).inference_network()
        return portable.build(arch)


def load_model(path: Path, rule: str = "given file", device: torch.device | str = "cpu") -> InferenceModel:
    """The inference network of a model file or a checkpoint, in eval mode on `device`, and its record."""
    path = Path(path)
    payload = read_artifact(path)
    if payload["format"] == ckpt.FORMAT:
        payload = model_payload(payload, path, rule)
        exported_from = None
    else:
        exported_from = payload["card"].get("exported_from")
    card = payload["card"]
    try:
        net = _build_network(payload["network"])
        weights = {k: v.to(device, copy=True, memory_format=torch.contiguous_format)
                   for k, v in payload["weights"].items()}
        net.load_state_dict(weights, strict=True, assign=True)
    except SemisegError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its network description and weights do not match "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); export it again"
                              ) from None
    left = [n for n, t in chain(net.named_parameters(), net.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the weights leave {', '.join(left[:3])} of the network unset; export it "
                              "again with this semiseg version")
    net.eval()
    names = {f.name for f in fields(InferenceProtocol)}
    protocol = InferenceProtocol(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in payload["inference"].items() if k in names})
    return InferenceModel(net, NetSpec(**payload["spec"]), TrainConfig(**card["config"]), protocol,
                          card["iteration"], card["rule"], card["best"], card["evaluated_output"],
                          payload["preprocessing"], path, exported_from, dict(card.get("record") or {}))
