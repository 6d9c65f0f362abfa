"""CAML's whole training update: the official `code/train_caml.py`, run in place and unmodified, against semiseg.

    python benchmarks/official_equivalence.py --method caml --step method --iteration 2000 \\
        --official /path/to/CAML --official-commit SHA [--write-fixture]

The official script (Herschel555/CAML, no licence: nothing of it is copied here) runs with `runpy` as `__main__`,
with its own options for the la-8 recipe (`--labelnum 8 --consistency_rampup 20`, `--num_filtered` as below),
from a scratch folder two levels deep, `.cuda()` made the identity (CPU) and these replacements around it, never
inside it:

- `networks.net_factory.net_factory` builds the official `CAML3d_v1` with `n_filters` (the factory hard-codes 16),
  loads semiseg's seeded weights mapped with `semiseg.official.key_map` and installs the keyed dropout of
  `official_equivalence._install_official_dropout` (the same masks as semiseg's, update after update).
- `dataloaders.dataset.LAHeart` is an empty stand-in and `torch.utils.data.DataLoader` hands the loop the seeded
  batches of `tests/golden_step_caml.case_batches` in the script's format (`image`, `label`, `idx`); before the
  first one it sets the script's iteration counter `iter_num` so that the loop's own increment makes the first
  update number `iteration - 2` (the ramp is then the script's `get_lambda_c(iter_num // 150)` at that update).
- `utils.feature_memory.MemoryBank` is subclassed to align the one random draw of the update: its
  `sample_labeled_features` runs unchanged except that the module's `random.sample(range(n), 256)` returns the
  256 entries of the class with the largest keys of `torch.rand(slots * voxels)` drawn from
  `sample_seed(seed, j)`, each entry keyed by its (slot, voxel) position. semiseg draws the same keys from
  torch's global RNG seeded with that seed, and takes the same top 256 per class: both codes then correlate with
  the same memory entries, in the same order. (The positions are read from the loop's
  `mask_prediction_correctly` when the bank is updated.)
- `torch.optim.SGD` records, at each update, the loop's loss terms, masks and counts from its frame, the
  gradients and the learning rate; after the last update's step it records the weights, the BatchNorm
  statistics and the bank, then raises to end the script. tqdm, tensorboardX, torchvision and medpy get
  stand-ins when they are not installed (progress bar, logging, the replaced dataset's transforms and the never
  reached validation). Every patch is undone afterwards.

Three updates (`UPDATES`), batches with labelled cases (0, 1), (2, 3), (1, 4): the last one overwrites slot 1 and
samples a bank of five slots written under three weight states. The comparison covers the losses of the last
update (loss_s: Dice of f_v + f_a; loss_c: the mutual MSE-to-sharpened term; loss_o: the omni-correlation CE
against the bank), lambda_c and lambda_o, the total, the counts of the filters (labelled voxels stored, agreed
unlabelled voxels, OCC rows after the top-K), the total loss and loss_o of every update, the gradients of the
last update, the weights after its SGD step, the BatchNorm running statistics (the heads' are what the bank
projection uses), the bank's content (stored voxels, labels and features of every slot) and, over the whole
15,000-update recipe, lambda_c, lambda_o (the script's own `get_lambda_c` / `get_lambda_o`) and the learning
rate (the script never changes the optimiser's rate: constant `--base_lr`, checked at every update run).
`--num-filtered` (default 12,800, the recipe's K) is passed to both; at 32^3 it truncates the larger class.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import runpy
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inplace import patched, purge_modules  # noqa: E402
from official_equivalence import _install_official_dropout, _row, _step_report  # noqa: E402 (puts tests/ on the path)

from golden_step_caml import (  # noqa: E402
    LABELED_SLOTS,
    PRESET,
    RECIPE_ITERATIONS,
    UPDATES,
    caml_updates,
    case_batches,
    sample_seed,
)

LABELNUM = 8  # the la-8 recipe: 8 labelled cases, 8 memory slots
RAMPUP = 20.0
NUM_FILTERED = 12800


class _Finished(Exception):
    """Raised after the last recorded update to end the official script."""


def _stand_ins() -> list[str]:
    """Modules the script imports for progress, logging, its dataset's transforms and validation only."""

    class Writer:
        def __init__(self, *a: Any, **k: Any) -> None: ...
        def add_scalar(self, *a: Any, **k: Any) -> None: ...
        def close(self) -> None: ...

    class Bar:
        def __init__(self, iterable: Any = (), *a: Any, **k: Any) -> None:
            self.iterable = iterable

        def __iter__(self) -> Iterator[Any]:
            return iter(self.iterable)

        def close(self) -> None: ...

    made = []
    for name, attrs in (("tensorboardX", {"SummaryWriter": Writer}), ("tqdm", {"tqdm": Bar}),
                        ("torchvision", {}), ("torchvision.transforms", {"Compose": lambda steps: steps}),
                        ("medpy", {}), ("medpy.metric", {})):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
            made.append(name)
    return made


def run_official(root: Path, n_filters: int, size: int, seed: int, iteration: int, num_filtered: int,
                 weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The official script's updates on the case; `weights` in semiseg's layout."""
    from semiseg.official import key_map

    code = root / "code"
    script = code / "train_caml.py"
    batches = case_batches(size, seed)
    voxels = size ** 3
    first = iteration - UPDATES + 1
    validating = [t for t in range(first, iteration) if t >= 800 and t % 200 == 0]
    if validating:  # the script would validate on the LA test set after these updates
        raise SystemExit(f"--iteration {iteration}: update {validating[0]} is a validation iteration of the "
                         "official script; choose another")
    record: dict[str, Any] = {"updates": [], "model": None}

    def loop_variables() -> dict[str, Any]:
        """The training loop's variables: the globals of the script's frame (it runs at module level)."""
        frame = sys._getframe(1)
        while frame.f_code.co_filename != str(script):
            frame = frame.f_back
        return frame.f_globals

    purge_modules(("networks", "utils", "dataloaders"))
    made = _stand_ins()
    sys.path.insert(0, str(code))
    import dataloaders.dataset as dataset
    import networks.net_factory as factory_module
    import utils.feature_memory as feature_memory

    real_factory, real_bank = factory_module.net_factory, feature_memory.MemoryBank

    def net_factory(net_type: str, in_chns: int, class_num: int, mode: str = "train") -> nn.Module:
        model = real_factory(net_type=net_type, in_chns=in_chns, class_num=class_num, mode=mode,
                             n_filters=n_filters)
        mapping = key_map(list(model.state_dict()), "caml", 3)
        model.load_state_dict({o: weights[m].clone() for o, m in mapping.items()})
        _install_official_dropout(model, "caml", 3, seed)
        record["model"], record["mapping"] = model, mapping
        return model

    class AlignedBank(real_bank):  # type: ignore[misc, valid-type]
        """The official bank; only the `random.sample` of its sampling draws from the shared keys."""

        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.positions: dict[int, torch.Tensor] = {}

        def update_labeled_features(self, features: Any, labels: Any, idxs: Any) -> None:
            mask = loop_variables()["mask_prediction_correctly"]  # the loop's [2, H, W, D] mask
            for i, slot in enumerate(idxs):
                self.positions[int(slot)] = mask[i].flatten().nonzero().flatten()
            super().update_labeled_features(features, labels, idxs)

        def sample_labeled_features(self, num_sampled_per_cls: int) -> Any:
            update = len(record["updates"])
            keys = torch.rand(LABELNUM * voxels, generator=torch.Generator().manual_seed(sample_seed(seed, update)))
            filled = [s for s in range(LABELNUM) if self.memory_label[s] is not None]
            entries = torch.cat([s * voxels + self.positions[s] for s in filled])
            labels = torch.from_numpy(np.concatenate([self.memory_label[s] for s in filled]))
            queue = [keys[entries[labels == c]] for c in range(self.num_cls)
                     if int((labels == c).sum()) >= num_sampled_per_cls]

            def sample(population: range, k: int) -> list[int]:
                class_keys = queue.pop(0)
                assert len(population) == len(class_keys)
                return class_keys.topk(k).indices.tolist()

            with patched(feature_memory, "random", types.SimpleNamespace(sample=sample)):
                return super().sample_labeled_features(num_sampled_per_cls)

    class StandInDataset:
        def __init__(self, *a: Any, **k: Any) -> None: ...

        def __len__(self) -> int:
            return 80

    class Loader:
        def __init__(self, *a: Any, **k: Any) -> None: ...

        def __len__(self) -> int:
            return LABELNUM // 2  # the script's TwoStreamBatchSampler: one epoch of the labelled list

        def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
            loop_variables()["iter_num"] = first - 1  # the loop increments it before computing the ramp
            for x, label, idx in batches:
                yield {"image": x, "label": label, "idx": idx}

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - the optimiser's own return
            g = loop_variables()
            model = record["model"]
            entry = {key: float(torch.as_tensor(g[key]).detach())
                     for key in ("loss_s", "loss_c", "loss_o", "lambda_c", "lambda_o", "loss")}
            entry.update(iteration=g["iter_num"], lr=[group["lr"] for group in self.param_groups],
                         stored_voxels=int(g["mask_prediction_correctly"].sum()),
                         agreed_voxels=int(g["mask_consist_unlabeled"].sum()),
                         occ_rows=int(g["corr_a"].shape[0]) if len(g["corr_a"]) else 0,
                         grads={k: p.grad.detach().clone() for k, p in model.named_parameters()})
            out = super().step(closure)
            record["updates"].append(entry)
            if len(record["updates"]) == UPDATES:
                bank = g["memory_bank"]
                record.update(after={k: p.detach().clone() for k, p in model.named_parameters()},
                              buffers={k: b.detach().clone() for k, b in model.named_buffers() if "running" in k},
                              bank={s: (torch.from_numpy(bank.memory_label[s]),
                                        torch.from_numpy(bank.memory_feature[s]))
                                    for s in range(LABELNUM) if bank.memory_label[s] is not None},
                              get_lambda_c=g["get_lambda_c"], get_lambda_o=g["get_lambda_o"], base_lr=g["base_lr"])
                raise _Finished
            return out

    argv = ["train_caml.py", "--labelnum", str(LABELNUM), "--consistency_rampup", str(RAMPUP),
            "--num_filtered", str(num_filtered), "--max_iteration", str(RECIPE_ITERATIONS), "--exp", "equivalence"]
    saved = (sys.argv, os.getcwd(), dict(os.environ), random.getstate(), np.random.get_state(),
             torch.get_rng_state(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             list(logging.getLogger().handlers))
    patches = [(factory_module, "net_factory", net_factory), (feature_memory, "MemoryBank", AlignedBank),
               (dataset, "LAHeart", StandInDataset), (torch.utils.data, "DataLoader", Loader),
               (torch.optim, "SGD", RecordingSGD), (torch.Tensor, "cuda", lambda self, *a, **k: self),
               (nn.Module, "cuda", lambda self, *a, **k: self)]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch) / "run" / "code"
            work.mkdir(parents=True)
            os.chdir(work)
            sys.argv = argv
            for obj, name, value in patches:
                setattr(obj, name, value)
            try:
                runpy.run_path(str(script), run_name="__main__")
            except _Finished:
                pass
            else:
                raise RuntimeError("the official script ended before the last compared update")
            finally:
                for handler in logging.getLogger().handlers[len(saved[-1]):]:
                    handler.close()
                logging.getLogger().handlers[:] = saved[-1]
                os.chdir(saved[1])
    finally:
        for obj, name, value in originals:
            setattr(obj, name, value)
        sys.argv = saved[0]
        os.environ.clear()
        os.environ.update(saved[2])
        random.setstate(saved[3])
        np.random.set_state(saved[4])
        torch.set_rng_state(saved[5])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[6], saved[7]
        sys.path.remove(str(code))
        purge_modules(("networks", "utils", "dataloaders"))
        for name in made:
            del sys.modules[name]
    return record


def compare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the table and the fixture (`official_equivalence._step_report` plus CAML's bank and counts)."""
    from golden_step import seeded_weights, summarize_output

    num_filtered = NUM_FILTERED
    ours = caml_updates(args.n_filters, args.size, args.seed, args.iteration, num_filtered)  # semiseg first
    ours["batch"] = 4
    theirs = run_official(Path(args.official), args.n_filters, args.size, args.seed, args.iteration, num_filtered,
                          seeded_weights(ours["method"].net, args.seed))
    updates, last = theirs["updates"], theirs["updates"][-1]
    assert [u["iteration"] for u in updates] == list(range(args.iteration - UPDATES + 1, args.iteration + 1))
    assert all(lr == theirs["base_lr"] for u in updates for lr in u["lr"])
    scalars = {key: last[key] for key in ("loss_s", "loss_c", "loss_o", "lambda_c", "lambda_o", "loss")}
    scalars.update({key: float(last[key]) for key in ("stored_voxels", "agreed_voxels", "occ_rows")})
    titles = {"loss_s": "loss_s (Dice f_v + f_a, labelled)", "loss_c": "loss_c (mutual MSE to sharpened)",
              "loss_o": "loss_o (omni-correlation CE vs bank)", "lambda_c": "lambda_c", "lambda_o": "lambda_o",
              "loss": "total 0.5 loss_s + lambda_c loss_c + lambda_o loss_o",
              "stored_voxels": "labelled voxels correct in both (stored)",
              "agreed_voxels": "unlabelled voxels where f_v, f_a agree", "occ_rows": "OCC rows after top-K"}
    for j, update in enumerate(updates, 1):
        for key, title in (("loss", "total loss"), ("loss_o", "loss_o"), ("occ_rows", "OCC rows"),
                           ("agreed_voxels", "agreed voxels")):
            scalars[f"{key}_{j}"] = float(update[key])
            titles[f"{key}_{j}"] = f"update {j} of {UPDATES} (iteration {update['iteration']}): {title}"
    recipe = range(1, RECIPE_ITERATIONS + 1)
    ramp = [theirs["get_lambda_c"](t // 150) for t in recipe]
    schedules = {"learning rate": [float(theirs["base_lr"])] * RECIPE_ITERATIONS}
    rows, meta = _step_report(args, "Herschel555/CAML", Path(args.official), ours, theirs["mapping"], scalars,
                              titles, last["grads"], {"student": theirs["after"]}, ramp, schedules)
    # lambda_o over the recipe is compared here but not stored (fixture size): CI holds lambda_c over the recipe
    # and lambda_o at the compared update, and semiseg derives both from one ramp.
    rows.append(_row(f"lambda_o, updates 1-{RECIPE_ITERATIONS}",
                     torch.tensor([theirs["get_lambda_o"](t // 150) for t in recipe], dtype=torch.float64),
                     torch.tensor(ours["lambda_o"], dtype=torch.float64)))
    # CAML's state beyond the weights: BatchNorm statistics and the memory bank.
    inverse = {m: o for o, m in theirs["mapping"].items()}
    rows.append(_row(f"BatchNorm running stats after update {UPDATES}",
                     torch.cat([theirs["buffers"][inverse[k]].double().flatten() for k in ours["buffers"]]),
                     torch.cat([v.double().flatten() for v in ours["buffers"].values()])))
    assert sorted(theirs["bank"]) == sorted({s for slots in LABELED_SLOTS for s in slots})
    slots = sorted(theirs["bank"])
    counts = torch.tensor([[int((theirs["bank"][s][0] == c).sum()) for c in (0, 1)] for s in slots])
    our_counts = torch.tensor([[int((ours["bank"][s]["labels"] == c).sum()) for c in (0, 1)] for s in slots])
    rows.append(_row(f"bank: stored voxels per slot {slots} and class", counts, our_counts))
    assert all(len(ours["bank"][s]["labels"]) == 0 for s in range(LABELNUM) if s not in slots)
    if torch.equal(counts, our_counts):
        rows.append(_row("bank: stored labels", torch.cat([theirs["bank"][s][0] for s in slots]),
                         torch.cat([ours["bank"][s]["labels"] for s in slots])))
        rows.append(_row("bank: stored features", torch.cat([theirs["bank"][s][1] for s in slots]),
                         torch.cat([ours["bank"][s]["features"] for s in slots])))
    meta.update(preset=PRESET, updates=UPDATES, labeled_slots=[list(s) for s in LABELED_SLOTS],
                num_filtered=num_filtered, labelnum=LABELNUM)
    meta["official"]["buffer_norms"] = {k: theirs["buffers"][inverse[k]].double().norm().item()
                                        for k in ours["buffers"]}
    meta["official"]["bank"] = {  # a slot overwritten with no voxel correct in both models holds an empty array
        str(s): {"class_counts": counts[i].tolist(),
                 **({"labels": summarize_output(theirs["bank"][s][0]),
                     "features": summarize_output(theirs["bank"][s][1])} if len(theirs["bank"][s][0]) else {})}
        for i, s in enumerate(slots)}
    return rows, meta
