"""The official CAML test script (Herschel555/CAML `code/test_3d.py`) on a semiseg CAML run's weights, in place.

    python benchmarks/official_caml_test.py export RUN CAML_CHECKOUT DATA SCRATCH
    python benchmarks/official_caml_test.py test CAML_CHECKOUT SCRATCH STRIDE_XY STRIDE_Z
    python benchmarks/official_caml_test.py semiseg WINDOWS evaluate RUN ...

Used by `lean_artifacts.py --official-caml`, which runs each step in its own process and reads the peak resident
set of the `test` process (that of the official script alone). The official code has no licence: it is imported and
run from the checkout, never copied; nothing of it is edited.

`export` (not measured): SCRATCH gets `data/LA` (a symlink to DATA, the LA layout the script reads from
`./data/LA`) and, in the folder where `test_3d.py` looks for the final checkpoint (`snapshot_path`, read from the
script's own globals by running its module body without its `__main__` block), `iter_N.pth`: the run's CAML network
(`method.net`, every tensor) under the official keys (`semiseg.official.to_official_state`), checked to load
*strictly* into the official test network (`net_factory(..., mode="test")`; the script itself loads with
`strict=False`, which would hide a missing key). N is the run's iteration count, passed as `--max_iteration`.

`test` (measured): `test_3d.py` runs unmodified as `__main__` from SCRATCH with `--labelnum 8 --max_iteration N`, with
three things patched around it: `torch.Tensor.cuda` / `nn.Module.cuda` are the identity (CPU), NumPy's removed
`np.int` alias is restored (the test utility uses it), and `utils.test_patch.test_all_case` is wrapped so that its
`stride_xy` / `stride_z` are STRIDE_XY / STRIDE_Z instead of the script's hard-coded 18 / 4 (the semiseg run's
stride; the windows are then the same as `semiseg evaluate`'s). `utils.test_patch.calculate_metric_percase` (medpy's
dc / jc / hd95 / asd) is wrapped to record its full-precision return values (the script prints them to 5 decimals),
and `test_single_case_first_output` to count the cases (an empty prediction is scored 0, 0, 0, 0 without medpy).
Everything else is the official script: it loads the whole file, scores one window at a time, writes the prediction,
score map, image and label of every case as NIfTI (its `save_result=True`). The last stdout line is a JSON object:
the per-case metrics in test-list order, the strides the script asked for and the ones used.

`semiseg WINDOWS ARGS` (measured): `semiseg ARGS` with at most WINDOWS paper-size windows per forward pass on CPU
instead of `semiseg.engine.model_file.CPU_WINDOWS` (1, as the official script's one window at a time): what the
activation memory of a larger window batch costs on top of the rest of the evaluation. The labels do not depend
on it.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPT = "code/test_3d.py"


def official_available(checkout: Path | None) -> bool:
    """True when `checkout` holds the official CAML test script (the benchmark skips the official column if not)."""
    return checkout is not None and (checkout / SCRIPT).is_file()


def _argv(iterations: int) -> list[str]:
    return [SCRIPT.rsplit("/", 1)[-1], "--labelnum", "8", "--max_iteration", str(iterations)]


def _enter(checkout: Path, scratch: Path, iterations: int) -> None:
    """cwd, import path and argv of the official script; the CPU and NumPy patches."""
    os.chdir(scratch)
    sys.path.insert(0, str((checkout / "code").resolve()))
    sys.argv = _argv(iterations)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    if "int" not in np.__dict__:
        np.int = int  # type: ignore[attr-defined]


def export(run: Path, checkout: Path, data: Path, scratch: Path) -> dict[str, Any]:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.official import official_layout, to_official_state

    payload = load_checkpoint(run / "checkpoint.pt")
    if payload["config"]["method"] != "caml":
        raise SystemExit(f"{run}: a {payload['config']['method']} run, not CAML")
    iterations = int(payload["config"]["iterations"])
    (scratch / "data").mkdir(parents=True, exist_ok=True)
    link = scratch / "data" / "LA"
    if not link.exists():
        link.symlink_to(data.resolve())
    _enter(checkout, scratch, iterations)
    script = runpy.run_path(str((checkout / SCRIPT).resolve()), run_name="official_test_3d")  # body, no __main__
    net = script["net_factory"](net_type="caml3d_v1", in_chns=1, class_num=2, mode="test")
    prefix = official_layout("caml", 3).target + "."
    ours = {k.removeprefix(prefix): v for k, v in payload["method"].items() if k.startswith(prefix)}
    state = to_official_state(ours, list(net.state_dict()), "caml", 3, str(run))
    net.load_state_dict(state, strict=True)
    snapshot = scratch / script["snapshot_path"]
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / f"iter_{iterations}.pth"
    torch.save(state, target)
    return {"weights": str(target), "tensors": len(state), "iterations": iterations}


def test(checkout: Path, scratch: Path, stride_xy: int, stride_z: int) -> dict[str, Any]:
    iterations = int(next((scratch / "model").rglob("iter_*.pth")).stem.split("_")[1])
    _enter(checkout, scratch, iterations)
    from utils import test_patch  # the official module, imported from the checkout

    asked: dict[str, int] = {}
    metrics: list[list[float] | None] = []  # per case; None: empty prediction, scored (0, 0, 0, 0) without medpy
    real_test_all_case, real_metric = test_patch.test_all_case, test_patch.calculate_metric_percase
    real_case = test_patch.test_single_case_first_output

    def test_all_case(*args: Any, **kwargs: Any) -> Any:
        asked.update(stride_xy=kwargs.get("stride_xy"), stride_z=kwargs.get("stride_z"))
        return real_test_all_case(*args, **{**kwargs, "stride_xy": stride_xy, "stride_z": stride_z})

    def single_case(*args: Any, **kwargs: Any) -> Any:
        metrics.append(None)
        return real_case(*args, **kwargs)

    def calculate_metric_percase(pred: np.ndarray, gt: np.ndarray) -> tuple:
        values = real_metric(pred, gt)
        metrics[-1] = [float(v) for v in values]
        return values

    test_patch.test_all_case = test_all_case
    test_patch.test_single_case_first_output = single_case
    test_patch.calculate_metric_percase = calculate_metric_percase
    runpy.run_path(str((checkout / SCRIPT).resolve()), run_name="__main__")
    cases = (scratch / "data" / "LA" / "test.list").read_text().split()
    return {"cases": dict(zip(cases, [m or [0.0] * 4 for m in metrics], strict=True)),
            "empty": [c for c, m in zip(cases, metrics, strict=True) if m is None], "strides_asked": asked,
            "strides_used": {"stride_xy": stride_xy, "stride_z": stride_z}}


def semiseg_with_windows(windows: int, args: list[str]) -> None:
    import semiseg.engine.model_file as model_file
    from semiseg.cli import main as cli

    model_file.CPU_WINDOWS = windows
    sys.argv = ["semiseg", *args]
    cli()


def main() -> None:
    if sys.argv[1:2] == ["semiseg"]:  # the CLI's own options follow: no argparse here
        semiseg_with_windows(int(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    e = sub.add_parser("export")
    for name in ("run", "checkout", "data", "scratch"):
        e.add_argument(name, type=Path)
    t = sub.add_parser("test")
    t.add_argument("checkout", type=Path)
    t.add_argument("scratch", type=Path)
    t.add_argument("stride_xy", type=int)
    t.add_argument("stride_z", type=int)
    args = parser.parse_args()
    if args.step == "export":
        result = export(args.run, args.checkout, args.data, args.scratch.resolve())
    else:
        result = test(args.checkout, args.scratch.resolve(), args.stride_xy, args.stride_z)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
