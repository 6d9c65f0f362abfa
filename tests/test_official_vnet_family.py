"""Official checkpoints of DTC, SS-Net and AD-MT load into the network that semiseg evaluates.

The key mapping itself is pinned by `tests/golden/{dtc,ssnet,admt}.json` (`test_golden.py`); these tests check
the loading path `semiseg evaluate --official-checkpoint` takes, on a state_dict written with the official key
names (from those fixtures), without the official code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from semiseg.methods import get_method
from semiseg.methods.base import NetSpec
from semiseg.official import key_map, load_official_checkpoint

GOLDEN = Path(__file__).parent / "golden"


def _official_file(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A state_dict with the official keys and shapes of the fixture, random values, saved like the scripts do."""
    keys = json.loads((GOLDEN / f"{name}.json").read_text())["official_keys"]
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=g) if not k.endswith("num_batches_tracked")
                 else torch.tensor(3)) for k, shape in keys.items()}
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return path, state


def _method(name: str):  # noqa: ANN202 - a semiseg Method
    cls = get_method(name)
    return cls(cls.Params(), NetSpec(1, 2, 3, 4))


def test_admt_checkpoint_reaches_both_teachers_and_the_evaluated_network(tmp_path: Path) -> None:
    path, state = _official_file(tmp_path, "admt")
    method = _method("admt")
    load_official_checkpoint(path, method)
    mapping = key_map(list(state), "admt", 3)
    for net in (method.net, *method.teachers, method.inference_network()):
        ours = net.state_dict()
        assert all(torch.equal(ours[s], state[o].to(ours[s].dtype)) for o, s in mapping.items())


def test_dtc_heads_map_to_the_level_set_and_segmentation_outputs(tmp_path: Path) -> None:
    path, state = _official_file(tmp_path, "dtc")
    method = _method("dtc")
    load_official_checkpoint(path, method)
    assert torch.equal(method.net.sdf_head.weight, state["out_conv.weight"])  # feeds the tanh
    assert torch.equal(method.net.vnet.decoder.out_conv.weight, state["out_conv2.weight"])  # the segmentation


def test_ssnet_checkpoint_loads_the_vnet_and_ignores_the_heads(tmp_path: Path) -> None:
    path, state = _official_file(tmp_path, "ssnet")
    method = _method("ssnet")
    heads = {k: v.clone() for k, v in method.projection_head.state_dict().items()}
    load_official_checkpoint(path, method)
    assert torch.equal(method.net.decoder.out_conv.weight, state["decoder.out_conv.weight"])
    assert all(torch.equal(v, method.projection_head.state_dict()[k]) for k, v in heads.items())


def test_ssnet_background_selectors_stay_out_of_the_update_as_in_the_official_code() -> None:
    """Only correct foreground voxels fill the official memory, so the background selectors never get a gradient
    and SGD (weight decay, momentum) leaves them alone; with `background_prototypes` they take part."""
    from golden_step import ball_batch
    from semiseg.data.loader import Batch
    from semiseg.methods.base import StepContext

    x, label = ball_batch(16, 0)
    for background, used in ((False, False), (True, True)):
        cls = get_method("ssnet")
        torch.manual_seed(0)
        method = cls(cls.Params(background_prototypes=background), NetSpec(1, 2, 3, 4))
        method.train()
        out = method.train_step(Batch(x[:2], label[:2], x[2:], torch.arange(2)), StepContext(2500, 15000))
        out.loss.backward()
        for selectors in (method.feature_selectors, method.memory_selectors):
            assert all((p.grad is not None) == used for p in selectors[0].parameters())
            assert all(p.grad is not None for p in selectors[1].parameters())
