"""An official LA test script on a semiseg run's weights, in place: CAML's (Herschel555/CAML) or MC-Net's
(ycwu1997/MC-Net, which scores MC-Net and MC-Net+ runs), both `code/test_3d.py` with `utils/test_patch.py`, or
SS-Net's (ycwu1997/SS-Net) and BCP's (DeepMed-Lab-ECNU/BCP, SS-Net's script with other paths), both
`code/test_LA.py` with `utils/test_3d_patch.py`; `TESTS` says which.

    python benchmarks/official_test.py export METHOD RUN CHECKOUT DATA SCRATCH
    python benchmarks/official_test.py test CHECKOUT SCRATCH STRIDE_XY STRIDE_Z
    python benchmarks/official_test.py semiseg WINDOWS evaluate RUN ...

Used by `lean_artifacts.py --official-caml / --official-mcnet / --official-ssnet / --official-bcp`, which runs each
step in its own process and reads the peak resident set of the `test` process (that of the official script alone).
The official code is imported and run from the checkout, never copied (CAML's has no licence; MC-Net's, SS-Net's and
BCP's are MIT); nothing of it is edited. SS-Net's and BCP's scripts keep the largest connected component by default
(`--nms 1`), with an `assert` that stops them on an empty prediction, which a 1-iteration run often makes: they run
with `--nms 0` and `semiseg evaluate` beside them with `--no-lcc` (`OfficialTest.semiseg_args`).

`export` (not measured): SCRATCH gets `data/LA` (a symlink to DATA, the LA layout the script reads from `./data/LA`)
and, in the folder where the script looks for the checkpoint (`snapshot_path`, read from the script's own globals by
running its module body without its `__main__` block), the file it loads: the run's network (every tensor) under the
official keys (`semiseg.official.to_official_state`), checked to load *strictly* into the official network it was
trained as (`net_factory(..., mode="test")`: CAML3d_v1, MCNet3d_v1, MCNet3d_v2 or SS-Net's / BCP's VNet; CAML's and
MC-Net's scripts load with `strict=False`, which would hide a missing key). CAML's script loads `iter_N.pth` into
that network (N the run's iterations, passed as `--max_iteration`); MC-Net's loads `{model}_best_model.pth` into a
one- decoder VNet with `strict=False` (the encoder and decoder 1 of the saved network: the output semiseg evaluates
too), so `export` also checks that every key of that VNet is in the file; SS-Net's and BCP's load
`VNet_best_model.pth` strictly into their VNet. SCRATCH/official.json records the call.

`test` (measured): the script runs unmodified as `__main__` from SCRATCH with the arguments `export` recorded, with
three things patched around it: `torch.Tensor.cuda` / `nn.Module.cuda` are the identity (CPU), NumPy's removed
`np.int` alias is restored (the test utilities use it), and the test utility's `test_all_case` is wrapped so that
its `stride_xy` / `stride_z` are STRIDE_XY / STRIDE_Z instead of the script's hard-coded 18 / 4 (the semiseg run's
stride; the windows are then the same as `semiseg evaluate`'s). Its `calculate_metric_percase` (medpy's dc / jc /
hd95 / asd) is wrapped to record its full-precision return values (the script prints them to 5 decimals), and its
per-case sliding window (`OfficialTest.single_case`) to count the cases (an empty prediction is scored 0, 0, 0, 0
without medpy). Everything else is the official script: it loads the whole file, scores one window at a time, writes
the prediction, score map, image and label of every case as NIfTI (its `save_result=True`). The last stdout line is
a JSON object: the per-case metrics in test-list order, the strides the script asked for and the ones used.

`semiseg WINDOWS ARGS` (measured): `semiseg ARGS` with at most WINDOWS paper-size windows per forward pass on CPU
instead of `semiseg.engine.model_file.CPU_WINDOWS` (1, as the official scripts' one window at a time): what the
activation memory of a larger window batch costs on top of the rest of the evaluation. The labels do not depend
on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCRIPT = "code/test_3d.py"


@dataclass(frozen=True)
class OfficialTest:
    """How one official test script is called and which file it loads ({iterations}: the run's iterations); its
    repository is the method's `semiseg.official` layout's."""

    net_type: str
    """`net_factory` name of the network the run's weights are saved as (loaded strictly by `export`)."""
    argv: tuple[str, ...]
    weights: str
    """The file name the script loads, inside its `snapshot_path`."""
    loaded_as: str | None = None
    """`net_factory` name of the network the script itself builds, when it is another one (MC-Net: `vnet`)."""
    script: str = SCRIPT
    """The test script, relative to the checkout (its folder goes on the import path)."""
    patch_module: str = "utils.test_patch"
    """The module of `test_all_case`, `calculate_metric_percase` and the per-case sliding window."""
    single_case: str = "test_single_case_first_output"
    """The per-case sliding-window function of `patch_module` (called once per case)."""
    semiseg_args: tuple[str, ...] = ()
    """Options of `semiseg evaluate` beside it that give it the script's post-processing."""


TESTS = {"caml": OfficialTest("caml3d_v1", ("--labelnum", "8", "--max_iteration", "{iterations}"),
                              "iter_{iterations}.pth"),
         "mcnet": OfficialTest("mcnet3d_v1", ("--labelnum", "8", "--model", "mcnet3d_v1"),
                               "mcnet3d_v1_best_model.pth", "vnet"),
         "mcnet_plus": OfficialTest("mcnet3d_v2", ("--labelnum", "8", "--model", "mcnet3d_v2"),
                                    "mcnet3d_v2_best_model.pth", "vnet"),
         # SS-Net's script loads strictly into the VNet it trains. Its default `--nms 1` (largest component, the
         # la-8 recipe's post_lcc) asserts on an empty prediction, which a 1-iteration run often makes: the
         # component filter is off on both sides (`--nms 0`, `semiseg evaluate --no-lcc`).
         "ssnet": OfficialTest("VNet", ("--labelnum", "8", "--nms", "0"), "VNet_best_model.pth",
                               script="code/test_LA.py", patch_module="utils.test_3d_patch",
                               single_case="test_single_case", semiseg_args=("--no-lcc",)),
         # BCP's is SS-Net's script with its authors' data path as the default root (given here) and the
         # self-training stage's folder; the same `--nms 1` default and the same choice.
         "bcp": OfficialTest("VNet", ("--labelnum", "8", "--root_path", "./data/LA/", "--nms", "0"),
                             "VNet_best_model.pth", script="code/test_LA.py", patch_module="utils.test_3d_patch",
                             single_case="test_single_case", semiseg_args=("--no-lcc",))}


def official_available(checkout: Path | None, method: str = "caml") -> bool:
    """True when `checkout` holds the method's official LA test script (the benchmark skips the official column
    if not)."""
    return checkout is not None and method in TESTS and (checkout / TESTS[method].script).is_file()


def _enter(checkout: Path, scratch: Path, spec: OfficialTest, argv: list[str]) -> None:
    """cwd, import path and argv of the official script; the CPU and NumPy patches."""
    os.chdir(scratch)
    sys.path.insert(0, str((checkout / spec.script).parent.resolve()))
    sys.argv = [spec.script.rsplit("/", 1)[-1], *argv]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    if "int" not in np.__dict__:
        np.int = int  # type: ignore[attr-defined]


def export(method: str, run: Path, checkout: Path, data: Path, scratch: Path) -> dict[str, Any]:
    from semiseg.engine.checkpoint import load_checkpoint
    from semiseg.official import official_layout, to_official_state

    if method not in TESTS:
        raise SystemExit(f"{method}: no official test script is wired up (one of {', '.join(TESTS)})")
    spec = TESTS[method]
    payload = load_checkpoint(run / "checkpoint.pt")
    if payload["config"]["method"] != method:
        raise SystemExit(f"{run}: a {payload['config']['method']} run, not {method}")
    iterations = int(payload["config"]["iterations"])
    (scratch / "data").mkdir(parents=True, exist_ok=True)
    link = scratch / "data" / "LA"
    if not link.exists():
        link.symlink_to(data.resolve())
    argv = [a.format(iterations=iterations) for a in spec.argv]
    _enter(checkout, scratch, spec, argv)
    script = runpy.run_path(str((checkout / spec.script).resolve()), run_name="official_test")  # body, no __main__
    net = script["net_factory"](net_type=spec.net_type, in_chns=1, class_num=2, mode="test")
    layout = official_layout(method, 3)
    prefix = layout.target + "."
    ours = {k.removeprefix(prefix): v for k, v in payload["method"].items() if k.startswith(prefix)}
    official_state = net.state_dict()
    state = to_official_state(ours, [k for k in official_state if not k.startswith(layout.ignored)], method, 3,
                              str(run))
    # Official modules semiseg does not build (SS-Net's contrastive heads: training-only, outside the forward pass
    # the test runs) keep the official network's own initial values, so that the script's strict load succeeds.
    state.update({k: v for k, v in official_state.items() if k.startswith(layout.ignored)})
    net.load_state_dict(state, strict=True)
    if spec.loaded_as is not None:
        loaded = script["net_factory"](net_type=spec.loaded_as, in_chns=1, class_num=2, mode="test")
        missing = loaded.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise SystemExit(f"the official {spec.loaded_as} network would keep its random {missing[0]} "
                             f"(and {len(missing) - 1} more): the test would not score the run")
    snapshot = scratch / script["snapshot_path"]
    snapshot.mkdir(parents=True, exist_ok=True)
    target = snapshot / spec.weights.format(iterations=iterations)
    torch.save(state, target)
    (scratch / "official.json").write_text(json.dumps({"method": method, "argv": argv}))
    return {"weights": str(target), "tensors": len(state), "iterations": iterations}


def test(checkout: Path, scratch: Path, stride_xy: int, stride_z: int) -> dict[str, Any]:
    call = json.loads((scratch / "official.json").read_text())
    spec = TESTS[call["method"]]
    _enter(checkout, scratch, spec, call["argv"])
    test_patch = importlib.import_module(spec.patch_module)  # the official module, imported from the checkout

    asked: dict[str, int] = {}
    metrics: list[list[float] | None] = []  # per case; None: empty prediction, scored (0, 0, 0, 0) without medpy
    real_test_all_case, real_metric = test_patch.test_all_case, test_patch.calculate_metric_percase
    real_case = getattr(test_patch, spec.single_case)

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
    setattr(test_patch, spec.single_case, single_case)
    test_patch.calculate_metric_percase = calculate_metric_percase
    runpy.run_path(str((checkout / spec.script).resolve()), run_name="__main__")
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
    e.add_argument("method", choices=sorted(TESTS))
    for name in ("run", "checkout", "data", "scratch"):
        e.add_argument(name, type=Path)
    t = sub.add_parser("test")
    t.add_argument("checkout", type=Path)
    t.add_argument("scratch", type=Path)
    t.add_argument("stride_xy", type=int)
    t.add_argument("stride_z", type=int)
    args = parser.parse_args()
    if args.step == "export":
        result = export(args.method, args.run, args.checkout, args.data, args.scratch.resolve())
    else:
        result = test(args.checkout, args.scratch.resolve(), args.stride_xy, args.stride_z)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
