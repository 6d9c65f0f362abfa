"""One whole AD-MT update of ZhenZHAO/AD-MT `code/train_post_3d_aut.py`, run in place and unmodified, against semiseg.

    python benchmarks/official_equivalence.py --method admt --step method --iteration 2500 \
        --official /tmp/official/AD-MT --official-commit 03ef84c79ae4db884133293cba647c571dbce25b [--write-fixture]

The official code has no licence: nothing of it is copied or transcribed here; the script runs as it is, with the
LA configuration of its `train_3d_aut.sh` (`--cfg cfgs/config_3d_la_aut.yml`, given as an absolute path), through
`benchmarks/official_inplace.py` (`runpy`, CPU, the stand-in loader, the recorded `SGD.step`; pandas, tqdm,
torchvision, medpy and cv2 are stand-ins when not installed: CSV logs, progress, the data transforms the stand-in
loader replaces, validation metrics, the colour jitter of the data transform). Aligned:

- `networks.vnet.VNet.__init__` is wrapped so that the script's three `net_factory("vnet")` calls (student,
  `ema_model` = teacher 1, `ema_model_another` = teacher 2) build 4-filter networks (the factory's default is
  16; same layout) holding `golden_step.seeded_weights` of semiseg's student / teacher 1 / teacher 2 (seeds s,
  s+1, s+2) mapped with `semiseg.official.key_map`, with keyed dropout tagged per network;
- the loader yields `golden_step_admt.case`: weak views, the fixed strong view of the unlabelled volumes (the
  same tensor semiseg's side is given) and labels, unlabelled first as the script's default sampler orders them;
- before the loop body runs, the iteration counter `iter_num` is set to K - 1 and the script's
  `AlternateUpdate` to the first update of a 5-update stretch of the case's teacher (flag True for teacher 1,
  False for teacher 2; counter 0, period 5), the state semiseg's side is given; `val_3D.var_all_case_LA` (the
  per-epoch validation, which reads the LA data) returns 0.

Compared: the supervised and unlabelled losses, the ramp weight, the total loss, the confident-voxel count (the
final `pseudo_mask` the loss uses) and the teachers' conflict-voxel count, the gradients, the student after the
SGD step, the updated teacher (weights and BatchNorm running statistics) after the EMA update, and the alternation
state after the update, in two cases: the first update of a teacher-1 stretch (`tests/golden/steps/admt.json`) and
the first update of a teacher-2 stretch with its CutMix (`admt_cutmix.json`): there NumPy's generator is seeded
too, the official box (drawn with NumPy) is recorded by wrapping `dataloaders.mixaugs.rand_bbox_3d` and given to
semiseg's side, and the permutation is `torch.randperm` after `torch.manual_seed(seed)` on both sides.

Schedule pass: the whole script (15,000 updates), unmodified, with a one-convolution stand-in network on 8^3
volumes; every `SGD.step` records the learning rate (poly, set after each step) and the loop's
`consistency_weight`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from official_equivalence import _install_official_dropout, _step_report
from official_inplace import Recorder, patch, run, set_frame_local
from torch import nn

SCRIPT = "code/train_post_3d_aut.py"
CONFIG = "cfgs/config_3d_la_aut.yml"


class _Dataset:
    """`LAHeart(...)`: the stand-in loader never reads it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def _no_data() -> Iterator[None]:
    with patch(importlib.import_module("dataloaders.dataset_3d"), "LAHeart", _Dataset), \
            patch(importlib.import_module("val_3D"), "var_all_case_LA", lambda *a, **k: 0.0):
        yield


def _official_update(args: argparse.Namespace, root: Path, case_name: str) -> dict[str, Any]:
    """One update of the script in place: the loop's locals, the three networks, the recorder, the CutMix boxes."""
    from golden_step import seeded_weights
    from golden_step_admt import STRETCH, TAGS, build, case, tag_dropout
    from semiseg.official import key_map

    k, seed = args.iteration, args.seed
    fx = {"n_filters": args.n_filters, "size": args.size, "seed": seed, "iteration": k}
    method, _ = build(fx)
    weights = [seeded_weights(net, seed + i) for i, net in enumerate((method.net, *method.teachers))]
    built: list[nn.Module] = []
    mapping: dict[str, str] = {}
    boxes: list[list[int]] = []

    @contextlib.contextmanager
    def seeded_networks() -> Iterator[None]:
        module = importlib.import_module("networks.vnet")
        mixaugs = importlib.import_module("dataloaders.mixaugs")
        init, rand_bbox_3d = module.VNet.__init__, mixaugs.rand_bbox_3d

        def seeded_init(self: nn.Module, *a: Any, **kw: Any) -> None:
            init(self, *a, **{**kw, "n_filters": args.n_filters})
            mapping.update(key_map(list(self.state_dict()), "admt", 3))
            i = len(built)
            self.load_state_dict({o: weights[i][m].clone() for o, m in mapping.items()})
            _install_official_dropout(self, "admt", 3, seed)
            tag_dropout(self, TAGS[i])
            built.append(self)

        def recorded_bbox(*a: Any, **kw: Any) -> Any:  # the official box, recorded for semiseg's side
            out = rand_bbox_3d(*a, **kw)
            boxes.extend([int(v) for v in corner] for corner in zip(*out))
            return out

        with patch(module.VNet, "__init__", seeded_init), patch(mixaugs, "rand_bbox_3d", recorded_bbox), _no_data():
            yield

    def before_body(frame: Any, i: int) -> None:
        alternation = frame.f_locals["alternate_indicator"]
        alternation.flag_alternate = case_name == "teacher1"
        alternation._counter, alternation.random_alternate_period = 0, STRETCH
        set_frame_local(frame, "iter_num", k - 1)
        np.random.seed(seed)  # the CutMix coin and box (NumPy) and the permutation (torch) of a teacher-2 stretch
        torch.manual_seed(seed)

    recorder = Recorder()
    frames = run(root / SCRIPT, ["--cfg", str((root / CONFIG).resolve())], [case(args.size, seed)], 38, recorder,
                 on_batch=before_body, patches=seeded_networks)
    return {"loop": frames["train"], "nets": built, "recorder": recorder, "mapping": mapping, "boxes": boxes}


TITLES = {"supervised": "supervised (CE + Dice) / 2", "unlabeled": "unlabelled CE (confident voxels)",
          "weight": "consistency weight", "loss": "total loss", "confident": "confident voxels (pseudo_mask, count)",
          "conflict": "teachers' conflict voxels (count)", "teacher1_active_after": "teacher 1 active after the update",
          "stretch_counter_after": "stretch counter after the update",
          "teacher_bn_norm": "updated teacher's BatchNorm running statistics (norm)"}


def _running_norm(net: nn.Module) -> float:
    return float(torch.cat([b.double().flatten() for n, b in net.named_buffers() if "running" in n]).norm())


def _scalars(loop: dict[str, Any]) -> dict[str, float]:
    def value(name: str) -> float:
        return float(torch.as_tensor(loop[name]).detach())

    alternation = loop["alternate_indicator"]
    return {"supervised": value("loss_lb"), "unlabeled": value("loss_ulb"), "weight": value("consistency_weight"),
            "loss": value("loss"), "confident": float(loop["pseudo_mask"].sum()),
            "conflict": float(loop["mtx_bool_conflict"].sum()),
            "teacher1_active_after": float(alternation.flag_alternate),
            "stretch_counter_after": float(alternation._counter)}


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step import ball_batch, run_length, sampled
    from golden_step_admt import semiseg_update

    root, seed = Path(args.official), args.seed
    fx = {"n_filters": args.n_filters, "size": args.size, "seed": seed, "iteration": args.iteration}
    schedule = Recorder(keep_grads=False, locals_kept=("consistency_weight",))
    tiny = ball_batch(8, seed)
    tiny_case = {"image_weak": tiny[0], "image_strong": tiny[0].flip(2), "label_aug": tiny[1]}
    run(root / SCRIPT, ["--cfg", str((root / CONFIG).resolve())], [tiny_case] * 15000, 38, schedule,
        patches=_tiny_network)
    ramp = [float(f["consistency_weight"]) for f in schedule.frame_locals]

    reports = []
    for case_name, teacher_index in (("teacher1", 1), ("teacher2_cutmix", 2)):
        official = _official_update(args, root, case_name)
        model, teacher = official["nets"][0], official["nets"][teacher_index]
        recorder = official["recorder"]
        ours = semiseg_update({**fx, "lr_at_step": recorder.lr[0], "case": case_name,
                               "cutmix_boxes": official["boxes"]})
        if reports:  # the CutMix case: the recipe's schedules are the first case's
            ours.update(ramp=reports[0][2]["ramp"], schedules=reports[0][2]["schedules"])
        by_id = {id(p): name for name, p in model.named_parameters()}
        grads = {by_id[i]: g for i, g in recorder.grads[0].items()}
        scalars = {**_scalars(official["loop"]), "teacher_bn_norm": _running_norm(teacher)}
        rows, meta = _step_report(args, "ZhenZHAO/AD-MT", root, ours, official["mapping"], scalars, TITLES, grads,
                                  {"student": dict(model.named_parameters()),
                                   "teacher": dict(teacher.named_parameters())},
                                  ramp, {"learning rate": schedule.lr})
        meta.update(lr_at_step=recorder.lr[0], script=SCRIPT, config=CONFIG, case=case_name,
                    cutmix_boxes=official["boxes"])
        reports.append((rows, meta, ours))
    (rows, meta, _), (cut_rows, cut_meta, _) = reports
    # Fixture size: the ramp run-length encoded, the poly rate sampled (the table above compares every update).
    meta["official"].update(ramp=run_length(ramp),
                            schedules={"learning rate (updates 1-5, then every 10th)": sampled(schedule.lr)})
    meta["ramp_encoding"] = "run length"
    # The CutMix case: its own fixture (the ramp and the schedules are checked once, in admt.json).
    cut_meta["official"].update(ramp=[], schedules={})
    rows += [{**r, "term": f"CutMix stretch: {r['term']}"} for r in cut_rows if "updates 1-" not in r["term"]]
    if args.write_fixture:
        path = Path(__file__).resolve().parents[1] / "tests" / "golden" / "steps" / "admt_cutmix.json"
        path.write_text(json.dumps({**cut_meta, "dtype": args.dtype}, indent=1) + "\n")
        print(f"fixture: tests/golden/steps/{path.name} ({path.stat().st_size / 1024:.0f} KiB)")
    return rows, meta


class _TinyNet(nn.Module):
    """Schedule pass only: two-class logits from one 1x1 convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@contextlib.contextmanager
def _tiny_network() -> Iterator[None]:
    with patch(importlib.import_module("networks.net_factory"), "VNet", _TinyNet), _no_data():
        yield
