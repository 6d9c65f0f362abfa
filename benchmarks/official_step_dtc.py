"""One whole DTC update of HiLab-git/DTC `code/train_la_dtc.py`, run in place and unmodified, against semiseg.

    python benchmarks/official_equivalence.py --method dtc --step method --iteration 2500 \
        --official /tmp/official/DTC --official-commit 2525b9ccba84d7872fe22328b8b3298e7eafdc12 [--write-fixture]

The script runs with its own defaults (`runpy`, `benchmarks/official_inplace.py`: CPU, the stand-in loader, the
recorded `SGD.step`). Aligned: the network class `networks.vnet_sdf.VNet` has its `__init__` wrapped so that
the script's own constructor call builds it with `--n-filters` base filters (the script uses the default 16; the
layout is the same), loads `golden_step.seeded_weights` of semiseg's `SDFVNet` through `semiseg.official.key_map`,
and gets keyed dropout (the same channel masks as semiseg's); the loader yields `golden_step.ball_batch` (2 labelled + 2
unlabelled, ball-shaped labels); the iteration counter `iter_num` is set to K - 1 before the loop body runs, so
the body is update K (ramp at `iter_num // 150`); nothing else is touched. The learning rate is the one the
script's optimiser holds at that step (its base rate: the counter jump does not replay the decays, which the
schedule pass below checks). Compared: L_dice, L_sdf (against the script's `compute_sdf`), the BCE the script
computes but never adds, the consistency, its weight, the total loss, the gradients and the weights after the
step.

Schedule pass: the same script, unmodified, runs all 6,000 updates with a one-convolution stand-in network on
8^3 volumes; every `SGD.step` records the learning rate and the loop's `consistency_weight`, which are compared
with semiseg's `la-16` recipe (`engine.trainer.learning_rate`, `DTC.consistency_weight`) over every update.
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

SCRIPT = "code/train_la_dtc.py"


class _Dataset:
    """`LAHeart(...)`: the stand-in loader never reads it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


class _TinyNet(nn.Module):
    """Schedule pass only: (tanh level set, segmentation logit) from one 1x1 convolution."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return torch.tanh(out), out


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from golden_step import ball_batch, run_length, seeded_weights
    from golden_step_dtc import build, semiseg_update
    from semiseg.official import key_map

    root, k, seed = Path(args.official), args.iteration, args.seed
    script = root / SCRIPT
    x, label = ball_batch(args.size, seed)
    built: list[nn.Module] = []
    mapping: dict[str, str] = {}
    weights: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def seeded_network() -> Iterator[None]:
        module = importlib.import_module("networks.vnet_sdf")

        init = module.VNet.__init__

        def seeded_init(self: nn.Module, *a: Any, **kw: Any) -> None:  # the class itself stays (super(VNet, ..))
            init(self, *a, **{**kw, "n_filters": args.n_filters})
            mapping.update(key_map(list(self.state_dict()), "dtc", 3))
            self.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
            _install_official_dropout(self, "dtc", 3, seed)
            built.append(self)

        dataset = importlib.import_module("dataloaders.la_heart")
        with patch(module.VNet, "__init__", seeded_init), patch(dataset, "LAHeart", _Dataset):
            yield

    fx = {"n_filters": args.n_filters, "size": args.size, "seed": seed, "iteration": k}
    weights.update(seeded_weights(build(fx)[0].net, seed))  # semiseg's keys; the official side maps them
    recorder = Recorder(locals_kept=("consistency_weight",))
    frames = run(script, [], [{"image": x, "label": label}], 40, recorder,
                 on_batch=lambda frame, i: set_frame_local(frame, "iter_num", k - 1), patches=seeded_network)
    loop = frames["<module>"]
    model = built[0]
    lr_at_step = recorder.lr[0]
    ours = semiseg_update({**fx, "lr_at_step": lr_at_step})
    by_id = {id(p): name for name, p in model.named_parameters()}
    grads = {by_id[i]: g for i, g in recorder.grads[0].items()}

    schedule = Recorder(keep_grads=False, locals_kept=("consistency_weight",))
    tiny_x, tiny_label = ball_batch(8, seed)
    run(script, [], [{"image": tiny_x, "label": tiny_label}] * 6000, 40, schedule, patches=_tiny_network)
    ramp = [float(f["consistency_weight"]) for f in schedule.frame_locals]

    names = {"dice": "loss_seg_dice", "sdf": "loss_sdf", "bce": "loss_seg", "consistency": "consistency_loss",
             "weight": "consistency_weight", "loss": "loss"}
    scalars = {key: float(torch.as_tensor(loop[name]).detach()) for key, name in names.items()}
    titles = {"dice": "L_dice (labelled)", "sdf": "L_sdf = MSE(tanh head, compute_sdf)",
              "bce": "BCE (computed, weight 0)", "consistency": "dual-task consistency", "weight": "consistency weight",
              "loss": "total loss"}
    rows, meta = _step_report(args, "HiLab-git/DTC", root, ours, mapping, scalars, titles, grads,
                              {"student": dict(model.named_parameters())}, ramp,
                              {"learning rate": schedule.lr})
    meta["lr_at_step"] = lr_at_step
    meta["script"] = SCRIPT
    # Fixture size: the ramp and the step rate run-length encoded (the table above compares every update).
    meta["official"].update(ramp=run_length(ramp),
                            schedules={"learning rate (value, run length)": run_length(schedule.lr)})
    meta["ramp_encoding"] = "run length"
    return rows, meta


@contextlib.contextmanager
def _tiny_network() -> Iterator[None]:
    with patch(importlib.import_module("networks.vnet_sdf"), "VNet", _TinyNet), \
            patch(importlib.import_module("dataloaders.la_heart"), "LAHeart", _Dataset):
        yield
