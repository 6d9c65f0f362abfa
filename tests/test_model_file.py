"""Model files (`semiseg export`, `model.pt`): round trips, lean loading from checkpoints, bad files."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from nifti_helpers import make_dataset
from semiseg.config import TrainConfig, build_config
from semiseg.engine.checkpoint import save_checkpoint
from semiseg.engine.evaluate import evaluate_checkpoint
from semiseg.engine.model_file import FORMAT, MODEL, cpu_windows_per_pass, export_model, load_model
from semiseg.engine.predict import predict_files
from semiseg.engine.trainer import Trainer
from semiseg.methods import METHODS, available_methods
from semiseg.methods.base import Method, NetSpec, StepOutput
from semiseg.nets import evaluated_parameters

TINY = {"patch_size": (32, 32, 16), "stride": (16, 16, 8), "n_filters": 4, "num_workers": 0, "batch_labeled": 1,
        "batch_unlabeled": 1}
FILE_KEYS = {"format", "version", "network", "weights", "spec", "inference", "preprocessing", "card"}


def cli(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    from semiseg.cli import main

    monkeypatch.setattr(sys, "argv", ["semiseg", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code or 0, captured.out, captured.err.strip()


def fake_checkpoint(path: Path, cfg: TrainConfig, spec: NetSpec) -> Method:
    """A checkpoint of an untrained method, as the trainer lays it out (no training needed)."""
    torch.manual_seed(0)
    method = cfg.method_class()(cfg.method_params(), spec)
    for module in method.modules():  # non-trivial BatchNorm statistics, so a wrong buffer would show
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(path, {"config": cfg.model_dump(mode="json"), "iteration": 1, "spec": asdict(spec),
                           "method": method.state_dict(), "optimizer": {}, "rng": {}, "best": {}})
    return method.eval()


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_exports_its_inference_network_exactly(name: str, tmp_path: Path) -> None:
    """The exported network computes what the method's inference network computes, from a file the size of it."""
    cfg = build_config(name, None, {"n_filters": 4})
    reference = fake_checkpoint(tmp_path / "checkpoint.pt", cfg, NetSpec(n_filters=4))
    export_model(tmp_path / "checkpoint.pt", tmp_path / MODEL, "last")
    payload = torch.load(tmp_path / MODEL, weights_only=True)
    assert set(payload) == FILE_KEYS and payload["format"] == FORMAT
    # a method with its own network class is exported through its method ("method"); every current one is a VNet
    assert payload["network"]["arch"] in ("vnet", "method")
    net = reference.inference_network()
    weight_bytes = 4 * evaluated_parameters(net)
    assert sum(t.numel() * t.element_size() for t in payload["weights"].values()) < 1.01 * weight_bytes
    assert (tmp_path / MODEL).stat().st_size < 1.10 * weight_bytes
    model = load_model(tmp_path / MODEL)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model.net(x), net(x))
    assert model.rule == "last" and model.iteration == 1 and model.config.method == name


@pytest.mark.parametrize(("name", "overrides", "arch"), [
    ("mlrpl", {"eval_output": "average"}, "decoder_average"),
    ("crossmatch", {"patch_size": (32, 32), "n_filters": 16}, "unet2d"),
])
def test_other_portable_architectures(name: str, overrides: dict, arch: str, tmp_path: Path) -> None:
    cfg = build_config(name, None, overrides)
    spec = NetSpec(num_classes=4, spatial_dims=2) if arch == "unet2d" else NetSpec(n_filters=4)
    reference = fake_checkpoint(tmp_path / "checkpoint.pt", cfg, spec)
    export_model(tmp_path / "checkpoint.pt", tmp_path / MODEL, "last")
    model = load_model(tmp_path / MODEL)
    assert torch.load(tmp_path / MODEL, weights_only=True)["network"]["arch"] == arch
    x = torch.randn(2, 1, 32, 32) if arch == "unet2d" else torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model.net(x), reference.inference_network()(x))
    assert getattr(model.net, "window_scores", False) == (arch == "decoder_average")
    assert model.protocol.mode == ("slicewise" if arch == "unet2d" else "sliding_window")


class _OddNet(nn.Module):
    """A network `nets.portable` does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.register_buffer("scale", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale[:, None, None, None]


class _OddMethod(Method):
    name = "odd"
    description = "test method with an unknown network"

    def __init__(self, params, spec) -> None:  # noqa: ANN001 - the Method signature
        super().__init__(params, spec)
        self.student = _OddNet()
        self.teacher = _OddNet()

    def train_step(self, batch, ctx) -> StepOutput:  # noqa: ANN001
        raise NotImplementedError

    def inference_network(self) -> nn.Module:
        return self.student


def test_unknown_network_is_exported_through_its_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "odd", _OddMethod)
    reference = fake_checkpoint(tmp_path / "checkpoint.pt", TrainConfig(method="odd"), NetSpec())
    export_model(tmp_path / "checkpoint.pt", tmp_path / MODEL, "last")
    payload = torch.load(tmp_path / MODEL, weights_only=True)
    assert payload["network"]["arch"] == "method" and set(payload["weights"]) == {"conv.weight", "conv.bias", "scale"}
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / MODEL).net(x), reference.student(x))


@pytest.fixture(scope="module")
def caml_run(tmp_path_factory: pytest.TempPathFactory, tiny_synthetic: str) -> Path:
    run = tmp_path_factory.mktemp("caml") / "run"
    cfg = build_config("caml", None, {**TINY, "data": tiny_synthetic, "labeled": 2, "iterations": 2,
                                      "num_filtered": 64, "memory_num": 8})
    Trainer(cfg, run, progress=False).run()
    return run


@pytest.mark.parametrize("method", ["supervised", "caml"])
def test_round_trip_metrics_from_model_file_equal_the_run_folder(method: str, tmp_path: Path, tiny_synthetic: str,
                                                                 caml_run: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = caml_run
    if method == "supervised":
        run = tmp_path / "run"
        Trainer(build_config(method, None, {**TINY, "data": tiny_synthetic, "labeled": 2, "iterations": 2}), run,
                progress=False).run()
    assert (run / MODEL).is_file()  # written at the end of training
    code, out, err = cli(["export", run, "--out", tmp_path / "shared" / "model.pt"], capsys, monkeypatch)
    assert code == 0, err
    exported = tmp_path / "shared" / "model.pt"
    assert f"model: {exported}" in out
    payload = torch.load(exported, weights_only=True)
    assert set(payload) == FILE_KEYS
    assert not any(k.startswith(("f_a", "memory", "projection")) for k in payload["weights"])
    assert payload["card"]["exported_from"] == str((run / "checkpoint.pt").resolve())
    from_run = evaluate_checkpoint(run, tmp_path / "eval-run", device="cpu")
    # the file itself, or (caml) a folder that holds only the model file
    from_file = evaluate_checkpoint(exported if method == "supervised" else exported.parent, tmp_path / "eval-file",
                                    device="cpu")
    assert from_file["cases"] == from_run["cases"] and from_file["metrics"] == from_run["metrics"]
    card, run_card = from_file["protocol"], from_run["protocol"]
    assert card["inference"] == run_card["inference"] and card["dataset"] == run_card["dataset"]
    assert card["checkpoint"]["rule"] == "last" and card["checkpoint"]["iteration"] == 2
    assert card["checkpoint"]["exported_from"] == str((run / "checkpoint.pt").resolve())
    assert card["checkpoint"]["path"] == str(exported)
    assert card["inference"]["sw_batch_size"] == 4  # on CPU: small windows are batched up to one paper-size window
    at_end = torch.load(run / MODEL, weights_only=True)["weights"]
    assert all(torch.equal(at_end[k], v) for k, v in payload["weights"].items())


def test_lean_loading_reads_only_the_inference_network(caml_run: Path) -> None:
    """From a CAML checkpoint: f_v alone, copied out of the memory-mapped file (bank, f_a, heads untouched)."""
    model = load_model(caml_run / "checkpoint.pt", device="cpu")
    n_f_v = evaluated_parameters(model.net)
    full = torch.load(caml_run / "checkpoint.pt", weights_only=True)["method"]
    assert n_f_v == sum(v.numel() for k, v in full.items() if k.startswith("net.f_v.") and v.is_floating_point()
                        and "running" not in k)
    assert full["memory_features"].numel() > 0  # the bank exists in the checkpoint, and was not loaded
    for name, tensor in model.net.state_dict().items():
        assert torch.equal(tensor, full[f"net.f_v.{name}"])
    assert not model.net.training and model.evaluated_output.startswith("f_v")


def test_predict_from_model_file_without_the_training_data(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file carries the prepared dataset's preprocessing: prediction needs neither the run nor the data."""
    from semiseg.data.prepare import prepare

    root = make_dataset(tmp_path / "MyData", n_labeled=2, n_unlabeled=0, n_test=1, channels=1)
    prepare(root, spacing="1.5,1.5,2")
    run = tmp_path / "run"
    Trainer(build_config("supervised", None, {**TINY, "data": str(root), "labeled": 2, "iterations": 1,
                                              "patch_size": (16, 16, 16), "stride": (8, 8, 8),
                                              "batch_labeled": 2}), run,
            progress=False).run()
    scan = tmp_path / "scan_0000.nii.gz"
    shutil.copy(root / "imagesTs" / "toy_002_0000.nii.gz", scan)
    expected = predict_files(run, [scan], tmp_path / "pred-run", "cpu")[0]
    shutil.rmtree(root)
    model = tmp_path / "elsewhere" / "model.pt"
    model.parent.mkdir()
    shutil.copy(run / MODEL, model)
    code, out, _ = cli(["predict", model, scan, "--out", tmp_path / "pred-file", "--device", "cpu"], capsys,
                       monkeypatch)
    assert code == 0
    import nibabel as nib

    written = Path(out.split()[-1])
    np.testing.assert_array_equal(np.asarray(nib.load(str(written)).dataobj),
                                  np.asarray(nib.load(str(expected)).dataobj))
    code, _, err = cli(["predict", run, scan, "--out", tmp_path / "pred-again"], capsys, monkeypatch)
    assert code == 2 and "pass --data with the dataset" in err  # a checkpoint reads the recipe from the data


def test_predict_h5_from_model_file_matches_the_run(caml_run: Path, tmp_path: Path, tiny_synthetic: str) -> None:
    from semiseg.data import open_dataset

    layout = open_dataset(tiny_synthetic)
    image = layout.case_path(layout.test_ids[0])
    (a,) = predict_files(caml_run, [image], tmp_path / "a", "cpu")
    (b,) = predict_files(caml_run / MODEL, [image], tmp_path / "b", "cpu")
    with h5py.File(a) as fa, h5py.File(b) as fb:
        np.testing.assert_array_equal(fa["label"][()], fb["label"][()])


def test_bad_model_files_are_one_line_errors(caml_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def error(*args: object) -> str:
        code, _, err = cli(list(args), capsys, monkeypatch)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
        return err

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)  # e.g. an official code's checkpoint
    out = ("--out", tmp_path / "eval")
    assert "foreign.pt: not in a semiseg run folder" in error("evaluate", foreign)  # nothing beside a user's file
    assert "not a semiseg model or checkpoint" in error("evaluate", foreign, *out)
    assert "not a semiseg model or checkpoint" in error("predict", foreign, tmp_path)
    assert not (tmp_path / "eval").exists()  # the refused evaluation's folder was not left behind
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((caml_run / MODEL).read_bytes()[:5000])
    assert "truncated.pt: unreadable checkpoint or model file" in error("evaluate", truncated, *out)
    newer = tmp_path / "newer.pt"
    payload = torch.load(caml_run / MODEL, weights_only=True)
    torch.save({**payload, "version": 99}, newer)
    assert "written by a newer semiseg (semiseg-model format 99)" in error("evaluate", newer, *out)
    broken = tmp_path / "broken.pt"
    torch.save({**payload, "weights": {k: v for k, v in payload["weights"].items() if "out_conv" not in k}}, broken)
    assert "broken.pt: its network description and weights do not match" in error("evaluate", broken, *out)
    assert "already a model file" in error("export", caml_run / MODEL, "--out", tmp_path / "again.pt")
    keep = tmp_path / "notes.pt"
    keep.write_text("my notes")
    assert "notes.pt: exists and is not a semiseg model file" in error("export", caml_run, "--out", keep)
    assert keep.read_text() == "my notes"
    assert "exists and is not a semiseg model file" in error("export", caml_run, "--out", caml_run / "checkpoint.pt")
    code, _, _ = cli(["export", caml_run, "--out", tmp_path / "m.pt"], capsys, monkeypatch)
    code_again, _, _ = cli(["export", caml_run, "--out", tmp_path / "m.pt"], capsys, monkeypatch)
    assert code == code_again == 0  # an earlier model file is replaced


def test_windows_per_forward_do_not_change_the_labels(caml_run: Path) -> None:
    from dataclasses import replace

    from semiseg.engine.inference import predict_volume

    model = load_model(caml_run / MODEL)
    image = np.random.default_rng(0).standard_normal((1, 40, 36, 24)).astype(np.float32)
    protocol = model.protocol_for(torch.device("cpu"))
    assert protocol.sw_batch_size == 4 and model.protocol.sw_batch_size == 4  # 32x32x16 windows: 4 fit in one
    paper = replace(model, protocol=replace(model.protocol, patch_size=(112, 112, 80)))
    assert paper.protocol_for(torch.device("cpu")).sw_batch_size == 1  # one window at a time, as the official code
    assert cpu_windows_per_pass((64, 64, 32)) == 7 and cpu_windows_per_pass((256, 256)) == 15
    labels = [predict_volume(model.net, image, replace(protocol, sw_batch_size=n), torch.device("cpu"))
              for n in (1, 2, 4)]
    assert all(np.array_equal(labels[0], other) for other in labels[1:])


def test_training_never_overwrites_a_users_model_pt(tmp_path: Path, tiny_synthetic: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / MODEL).write_text("mine")
    Trainer(build_config("supervised", None, {**TINY, "data": tiny_synthetic, "labeled": 2, "iterations": 1,
                                              "batch_labeled": 2}), run, progress=False).run()
    assert (run / MODEL).read_text() == "mine" and (run / "checkpoint.pt").is_file()
    err = capsys.readouterr().err
    assert "note: " in err and "model.pt: exists and is not a semiseg model file" in err
