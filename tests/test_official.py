"""Official checkpoints: `semiseg.official` maps a file the authors' code saved onto semiseg's network.

The fixture `official_caml_pth` is the state_dict the official CAML constructor saved (kept as arrays in
`golden/official/caml_f2_seed0.npz`, written back as the official `.pth` by tests/official_fixture.py; provenance
and the official network's output in `caml_f2_seed0.json`); the official code itself is not needed here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from golden_step import inputs, summarize_output
from semiseg.errors import CheckpointError, ConfigError
from semiseg.methods import get_method
from semiseg.methods.base import NetSpec
from semiseg.official import key_map, load_official_checkpoint, official_layout, unwrap_state_dict

OFFICIAL = Path(__file__).parent / "golden" / "official"


def _caml(n_filters: int = 2):
    cls = get_method("caml")
    return cls(cls.Params(), NetSpec(1, 2, 3, n_filters))


def test_official_caml_checkpoint_gives_the_official_output(official_caml_pth: Path) -> None:
    method = _caml()
    load_official_checkpoint(official_caml_pth, method)
    state = torch.load(official_caml_pth, weights_only=True)
    assert torch.equal(method.net.f_a.encoder.x4_transform.inter_sample.linear1.weight,
                       state["encoder2.inter_attention.encoder_layers.linear1.weight"])
    assert torch.equal(method.net.projection_v.bn.running_var, state["projection_head1.1.running_var"])
    want = json.loads((OFFICIAL / "caml_f2_seed0.json").read_text())["eval_output_seg_v"]
    method.eval()
    with torch.no_grad():
        got = summarize_output(method.inference_network()(inputs(3, 32, 1, 2, 0)[0]))
    assert got["shape"] == want["shape"]
    for a, b in zip(want["samples"], got["samples"]):
        assert abs(a - b) <= 1e-5 * want["max_abs"]
    assert abs(want["sum"] - got["sum"]) <= 1e-5 * want["abs_sum"]


def test_wrapped_and_ddp_state_dicts_unwrap() -> None:
    state = {"encoder.block_one.conv.0.weight": torch.zeros(1)}
    for payload in ({"net": state, "opt": {}}, {"model": {f"module.{k}": v for k, v in state.items()}}, state):
        assert list(unwrap_state_dict(payload, "f")) == list(state)
    with pytest.raises(CheckpointError, match="not an official state_dict"):
        unwrap_state_dict({"epoch": 3}, "f.pth")


def test_wrong_method_or_size_is_a_one_line_error(tmp_path: Path, official_caml_pth: Path) -> None:
    cls = get_method("mcnet")
    with pytest.raises(CheckpointError, match="is not part of"):
        load_official_checkpoint(official_caml_pth, cls(cls.Params(), NetSpec(1, 2, 3, 2)))
    with pytest.raises(CheckpointError, match="n_filters"):
        load_official_checkpoint(official_caml_pth, _caml(4))
    with pytest.raises(ConfigError, match="no official 3D network"):
        official_layout("supervised", 3)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_official_checkpoint(bad, _caml())


def test_flat_and_2d_key_rules() -> None:
    flat = key_map(["block_one_dw.conv.0.weight", "block_five_up.conv.1.bias", "out_conv.weight"],
                   "mean_teacher", 3)
    assert list(flat.values()) == ["encoder.down_one.0.weight", "decoder.up_five.1.bias", "decoder.out_conv.weight"]
    two = key_map(["encoder.down3.maxpool_conv.1.conv_conv.4.weight", "decoder.up1.conv.conv_conv.0.bias"],
                  "crossmatch", 2)
    assert list(two.values()) == ["encoder.downs.2.1.4.weight", "decoder.ups.0.conv.0.bias"]


def _cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err.strip()


def test_cli_evaluates_an_official_checkpoint(tmp_path: Path, tiny_synthetic: str, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch, official_caml_pth: Path) -> None:
    out = tmp_path / "eval"
    code, stdout, err = _cli(["evaluate", "--official-checkpoint", str(official_caml_pth), "--method", "caml", "--data",
                              tiny_synthetic, "--set", "n_filters=2", "--set", "patch_size=32,32,32", "--set",
                              "stride=16,16,16", "--out", str(out), "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["checkpoint"]["rule"] == "official"
    assert len(summary["cases"]) == 2
    assert "official checkpoint" in stdout
    refused = tmp_path / "refused"
    for args, message in ((["--data", tiny_synthetic], "needs --method"),
                          (["--method", "mcnet", "--data", tiny_synthetic, "--set", "n_filters=2", "--out",
                            str(refused)], "is not part of"),
                          (["--method", "caml", "--data", tiny_synthetic], "not in a semiseg run folder")):
        code, _, err = _cli(["evaluate", "--official-checkpoint", str(official_caml_pth), *args], capsys, monkeypatch)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    # refused: no folder left behind, and nothing is ever written beside the user's file unasked
    assert not refused.exists() and not (official_caml_pth.parent / "eval-test").exists()
