"""One whole SS-Net update of ycwu1997/SS-Net `code/train_ss_3d.py`, run in place and unmodified, against semiseg.

    python benchmarks/official_equivalence.py --method ssnet --step method --iteration 2500 --size 16 \
        --n-filters 16 --official /tmp/official/SS-Net \
        --official-commit c0a8bf6e535ad1166ff8f3f871dc5cb9273e4573 [--write-fixture]

The script runs with its own defaults (`benchmarks/official_inplace.py`: `runpy`, CPU, the stand-in loader, the
recorded `SGD.step`). Aligned: `networks.VNet.VNet.__init__` is wrapped so that the script's `net_factory` call
builds its network (16 base filters: the official heads are 16 -> 32 wide whatever the width) and then loads
`golden_step.seeded_weights` of the whole semiseg method (VNet, heads, selectors) through
`golden_step_ssnet.official_to_semiseg`, and gets keyed dropout (the same masks as semiseg's, call by call: the
forward, then VAT's three); the loader yields `golden_step.ball_batch`; before the loop body runs, the iteration
counter `iter_num` is set to K - 1 (the body increments it and evaluates the ramp at `iter_num // 150`) and
`torch.manual_seed(seed)` is called, as semiseg's side does before its step, so that VAT's random direction
`torch.rand(x.shape)` is the same draw. The prototype memory is the script's own, new (empty) as at the start of
every run; the script refills it from the batch before using it. Compared: L_dice, L_vat, both prototype terms,
the ramp weight, the total loss, the number of labelled voxels correctly predicted foreground (the memory's
candidates), the memory rows and their norm after the update, the unlabelled voxels pseudo-labelled foreground,
the gradients (heads and selectors included) and the weights after the step.

Schedule pass: the whole script (15,000 updates), unmodified, with a stand-in forward (two 1x1 convolutions giving
the logits and a 16-channel embedding; the official heads, memory and losses as they are) on 8^3 volumes, the
validation (`utils.test_3d_patch.var_all_case_LA`, which reads the LA data) returning 0; every `SGD.step`
records the learning rate and the loop's `consistency_weight`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from official_equivalence import _install_official_dropout, _step_report
from official_inplace import Recorder, patch, run, set_frame_local
from torch import nn

SCRIPT = "code/train_ss_3d.py"


class _Dataset:
    """`LAHeart(...)`: the stand-in loader never reads it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def _no_data() -> Iterator[None]:
    """The dataset class and the validation, both of which read the LA data."""
    with patch(importlib.import_module("dataloaders.dataset"), "LAHeart", _Dataset), \
            patch(importlib.import_module("utils.test_3d_patch"), "var_all_case_LA", lambda *a, **k: 0.0):
        yield


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step import ball_batch, run_length, seeded_weights
    from golden_step_ssnet import build, official_to_semiseg, semiseg_update

    root, k, seed = Path(args.official), args.iteration, args.seed
    script = root / SCRIPT
    x, label = ball_batch(args.size, seed)
    fx = {"n_filters": args.n_filters, "size": args.size, "seed": seed, "iteration": k}
    method, _ = build(fx)
    weights = seeded_weights(method, seed)
    built: list[nn.Module] = []
    mapping: dict[str, str] = {}

    @contextlib.contextmanager
    def seeded_network() -> Iterator[None]:
        module = importlib.import_module("networks.VNet")
        init = module.VNet.__init__

        def seeded_init(self: nn.Module, *a: Any, **kw: Any) -> None:
            init(self, *a, **{**kw, "n_filters": args.n_filters})
            mapping.update(official_to_semiseg(list(self.state_dict())))
            self.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
            _install_official_dropout(self, "ssnet", 3, seed)
            built.append(self)

        with patch(module.VNet, "__init__", seeded_init), _no_data():
            yield

    def before_body(frame: Any, i: int) -> None:
        set_frame_local(frame, "iter_num", k - 1)
        torch.manual_seed(seed)

    recorder = Recorder()
    frames = run(script, [], [{"image": x, "label": label}], 38, recorder, on_batch=before_body,
                 patches=seeded_network)
    loop, model = frames["<module>"], built[0]
    lr_at_step = recorder.lr[0]
    ours = semiseg_update({**fx, "lr_at_step": lr_at_step})
    by_id = {id(p): name for name, p in model.named_parameters()}
    grads = {by_id[i]: g for i, g in recorder.grads[0].items()}
    memory = torch.as_tensor(loop["prototype_memory"].memory[1])

    schedule = Recorder(keep_grads=False, locals_kept=("consistency_weight",))
    tiny_x, tiny_label = ball_batch(8, seed)
    run(script, [], [{"image": tiny_x, "label": tiny_label}] * 15000, 38, schedule, patches=_tiny_network)
    ramp = [float(f["consistency_weight"]) for f in schedule.frame_locals]

    def value(name: str) -> float:
        return float(torch.as_tensor(loop[name]).detach())

    scalars = {"dice": value("loss_seg_dice"), "vat": value("loss_lds"), "proto_l": value("loss_contr_labeled"),
               "proto_u": value("loss_contr_unlabeled"), "weight": value("consistency_weight"),
               "loss": value("loss"), "correct_foreground": float(loop["mask_prediction_correctly"].sum()),
               "memory_rows": float(len(memory)), "memory_norm": float(memory.double().norm()),
               "pseudo_foreground": float((loop["pseudo_label"] == 1).sum())}
    titles = {"dice": "L_dice (labelled)", "vat": "L_vat (VAT3d, Dice)", "proto_l": "prototype term, labelled",
              "proto_u": "prototype term, unlabelled", "weight": "consistency weight", "loss": "total loss",
              "correct_foreground": "labelled voxels correctly predicted foreground (count)",
              "memory_rows": "foreground memory rows", "memory_norm": "foreground memory norm (after)",
              "pseudo_foreground": "unlabelled voxels pseudo-labelled foreground (count)"}
    rows, meta = _step_report(args, "ycwu1997/SS-Net", root, ours, mapping, scalars, titles, grads,
                              {"student": dict(model.named_parameters())}, ramp, {"learning rate": schedule.lr})
    meta["lr_at_step"] = lr_at_step
    meta["script"] = SCRIPT
    # Fixture size: the ramp and the step rate run-length encoded (the table above compares every update).
    meta["official"].update(ramp=run_length(ramp),
                            schedules={"learning rate (value, run length)": run_length(schedule.lr)})
    meta["ramp_encoding"] = "run length"
    return rows, meta


class _TinyForward(nn.Module):
    """Schedule pass only: logits and a 16-channel embedding from 1x1 convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.logits, self.embedding = nn.Conv3d(1, 2, 1), nn.Conv3d(1, 16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits(x), self.embedding(x)


@contextlib.contextmanager
def _tiny_network() -> Iterator[None]:
    module = importlib.import_module("networks.VNet")
    init = module.VNet.__init__

    def tiny_init(self: nn.Module, *a: Any, **kw: Any) -> None:
        init(self, *a, **{**kw, "n_filters": 1})  # the official heads and selectors, a one-filter VNet unused
        self.tiny = _TinyForward()

    with patch(module.VNet, "__init__", tiny_init), patch(module.VNet, "forward", lambda self, x: self.tiny(x)), \
            _no_data():
        yield
