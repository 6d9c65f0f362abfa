"""CPU speed options: batched teacher passes keep the maths, BatchNorm folding and bf16 stay options, the fp32
evaluation path is unchanged, threads follow the cores, channels-last is the CPU default for 3D methods, and kept
freed memory removes the page faults without changing a number."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import semiseg
from semiseg.config import build_config
from semiseg.engine.inference import (
    InferenceProtocol,
    autocast_for,
    fold_batchnorm,
    predict_volume,
    sliding_window_probs,
    window_starts,
)
from semiseg.engine.reductions import class_argmax
from semiseg.engine.trainer import Trainer, available_cores, set_threads, uses_channels_last
from semiseg.errors import ConfigError
from semiseg.methods.base import NetSpec
from semiseg.methods.uamt import UAMT, UAMTParams
from semiseg.nets import VNet
from semiseg.nets.batched import batchnorm_per_pass

SPEC = NetSpec(1, 2, 3, 4, "batchnorm", 0.0)


def _vnet() -> VNet:
    torch.manual_seed(0)
    return VNet(1, 2, 4, dropout=0.0)


def test_batchnorm_per_pass_equals_separate_train_mode_passes() -> None:
    a, b = _vnet().train(), None
    b = copy.deepcopy(a)
    x = [torch.randn(n, 1, 16, 16, 16) for n in (2, 2, 4)]
    with torch.no_grad():
        separate = torch.cat([a(p) for p in x])
        with batchnorm_per_pass(b, [2, 2, 4]):
            batched = b(torch.cat(x))
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    for (name, buf_a), buf_b in zip(a.named_buffers(), b.buffers(), strict=True):  # running stats, 3 updates each
        torch.testing.assert_close(buf_b, buf_a, rtol=1e-4, atol=1e-6, msg=name)
    assert not any("forward" in vars(m) for m in b.modules())  # the class's forward is back
    with pytest.raises(ValueError, match="does not split"), torch.no_grad(), batchnorm_per_pass(b, [2, 2]):
        b(torch.cat(x))


def test_uamt_single_teacher_pass_equals_the_official_per_pass_calls() -> None:
    """Without noise and dropout both paths are deterministic: same target, same entropy, same teacher buffers."""
    results = {}
    for single in (True, False):
        torch.manual_seed(0)
        method = UAMT(UAMTParams(single_pass=single, noise_std=0.0), SPEC).train()
        x = torch.randn(2, 1, 16, 16, 16)
        calls: list[int] = []
        method.teacher.net.register_forward_hook(lambda _m, args, _o, calls=calls: calls.append(len(args[0])))
        target, entropy = method.teacher_passes(x)
        results[single] = (target, entropy, [b.clone() for b in method.teacher.buffers()], calls)
    assert results[True][3] == [2 + 16] and results[False][3] == [2, 4, 4, 4, 4]
    for got, want in zip(results[True][:2], results[False][:2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(results[True][2], results[False][2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _trained_bn_net() -> VNet:
    net = _vnet()
    with torch.no_grad():  # non-trivial running statistics
        net.train()
        for _ in range(3):
            net(torch.randn(2, 1, 16, 16, 16) * 2 + 0.5)
    return net.eval()


def test_fold_batchnorm_matches_and_leaves_the_network_alone() -> None:
    net = _trained_bn_net()
    before = copy.deepcopy(net.state_dict())
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def _reference_probs(net: torch.nn.Module, image: torch.Tensor, patch, stride) -> torch.Tensor:
    """The protocol written out plainly: one window at a time, mean of softmax, fp32 (no padding needed here)."""
    size = image.shape[1:]
    score = torch.zeros((2, *size))
    count = torch.zeros(size)
    starts = [window_starts(s, p, t) for s, p, t in zip(size, patch, stride)]
    with torch.no_grad():
        for a in starts[0]:
            for b in starts[1]:
                for c in starts[2]:
                    w = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                    score[(slice(None), *w)] += net(image[(slice(None), *w)][None])[0].softmax(0)
                    count[w] += 1
    return score / count


def test_default_fp32_inference_equals_the_plain_protocol_and_options_stay_close() -> None:
    net = _trained_bn_net()
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 24, 24, 20)).astype(np.float32)
    protocol = InferenceProtocol(patch_size=(16, 16, 16), stride=(8, 8, 4))
    assert not protocol.cpu_bf16 and not protocol.fold_bn  # the fast paths are options
    reference = _reference_probs(net, torch.from_numpy(image), (16, 16, 16), (8, 8, 4))
    probs = sliding_window_probs(net, torch.from_numpy(image), (16, 16, 16), (8, 8, 4))
    torch.testing.assert_close(probs, reference, rtol=1e-5, atol=1e-6)
    label = predict_volume(net, image, protocol, torch.device("cpu"))
    decided = (reference - reference.flip(0)).abs()[0] > 1e-4  # voxels not at a rounding-level tie
    assert np.array_equal(label[decided.numpy()], reference.argmax(0).numpy()[decided.numpy()])
    for option in ({"fold_bn": True}, {"cpu_bf16": True}):
        fast = predict_volume(net, image, InferenceProtocol(patch_size=(16, 16, 16), stride=(8, 8, 4), **option),
                              torch.device("cpu"))
        assert (fast == label).mean() > 0.98, option


def test_cpu_bf16_autocast_is_an_option() -> None:
    cpu = torch.device("cpu")
    with autocast_for(cpu):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    with autocast_for(cpu, cpu_bf16=True):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


def test_cpu_bf16_without_native_bf16_says_so_once(monkeypatch, capsys) -> None:
    """bf16 is emulated (many times slower than fp32) on CPUs without AVX512-BF16 / AMX: one note, not one per step."""
    from semiseg.engine import cpu_features

    assert cpu_features.native_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"})) is True
    assert cpu_features.native_bf16(frozenset({"avx2", "amx_tile", "amx_bf16"})) is True
    assert cpu_features.native_bf16(frozenset({"avx2", "fma"})) is False
    assert cpu_features.native_bf16(frozenset()) is None
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    cpu_features.warn_emulated_bf16.cache_clear()
    try:
        for _ in range(3):
            with autocast_for(torch.device("cpu"), cpu_bf16=True):
                pass
        with autocast_for(torch.device("cpu")):
            pass
        err = capsys.readouterr().err
        assert err.count("note: cpu_bf16 is on but this CPU has neither AVX512-BF16 nor AMX") == 1
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
        cpu_features.warn_emulated_bf16.cache_clear()
        with autocast_for(torch.device("cpu"), cpu_bf16=True):
            pass
        assert capsys.readouterr().err == ""
    finally:
        cpu_features.warn_emulated_bf16.cache_clear()


def test_threads_follow_the_usable_cores_or_omp_num_threads(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads(0)
        assert torch.get_num_threads() == available_cores() == len(os.sched_getaffinity(0))
        set_threads(1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        set_threads(0)
        assert torch.get_num_threads() == 3
        set_threads(2)  # an explicit `threads` wins
        assert torch.get_num_threads() == 2
        for junk in ("0", "two", ""):
            monkeypatch.setenv("OMP_NUM_THREADS", junk)
            set_threads(0)
            assert torch.get_num_threads() == available_cores()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads"):
        build_config("supervised", overrides={"threads": -1})


def test_channels_last_auto_takes_it_on_cpu_for_3d_only() -> None:
    cfg = build_config("supervised", overrides={"device": "cpu"})
    assert uses_channels_last(cfg, torch.device("cpu"), 3)
    assert not uses_channels_last(cfg, torch.device("cpu"), 2)
    assert not uses_channels_last(build_config("supervised", overrides={"channels_last": "off"}),
                                  torch.device("cpu"), 3)


def test_evaluate_card_states_the_fast_options(tmp_path, tiny_synthetic: str) -> None:
    """Default evaluation is unchanged by the options existing; --fold-bn / --cpu-bf16 are named on the card."""
    from semiseg.engine.evaluate import evaluate_checkpoint

    cfg = build_config("supervised", overrides={"data": tiny_synthetic, "labeled": 4, "iterations": 1,
                                                 "patch_size": (32, 32, 32), "stride": (16, 16, 16),
                                                 "n_filters": 4, "num_workers": 0, "device": "cpu"})
    Trainer(cfg, tmp_path / "run", progress=False).run()
    plain = evaluate_checkpoint(tmp_path / "run", tmp_path / "e1", device="cpu")
    again = evaluate_checkpoint(tmp_path / "run", tmp_path / "e2", device="cpu", cpu_bf16=False, fold_bn=False)
    assert plain["cases"] == again["cases"]
    assert plain["protocol"]["inference"]["fold_bn"] is False and plain["protocol"]["inference"]["cpu_bf16"] is False
    fast = evaluate_checkpoint(tmp_path / "run", tmp_path / "e3", device="cpu", fold_bn=True, cpu_bf16=True)
    assert fast["protocol"]["inference"]["fold_bn"] is True and fast["protocol"]["inference"]["cpu_bf16"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_argmax_equals_argmax_with_ties_nan_and_channels_last(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 4, 6, 5, 3)).to(dtype)  # integer values: many ties between classes
    x[0, 2, 1, 1, 1] = float("nan")
    for t in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        for dim in (0, 1):
            assert torch.equal(class_argmax(t, dim), t.argmax(dim))
    assert class_argmax(x)[0, 1, 1, 1] == 2  # NaN wins, as in argmax


FAULTS = """
import resource, sys, torch
from semiseg.engine.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()


def step():  # a training step's pattern: large tensors alive together (16-64 MiB), all freed at its end
    alive = [torch.ones(n) for n in (2**23, 2**22, 2**24, 2**23)]
    return len(alive)


step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_with_fewer_page_faults() -> None:
    faults = {v: int(subprocess.run([sys.executable, "-c", FAULTS, v], capture_output=True, text=True,
                                    check=True).stdout) for v in ("system", "keep")}
    fresh_pages = 5 * (2**23 + 2**22 + 2**24 + 2**23) * 4 // 4096
    assert faults["system"] >= 0.8 * fresh_pages  # (nearly) every step maps its pages afresh
    assert faults["keep"] < 0.6 * faults["system"]  # glibc 2.36 reuses part (aligned blocks of one size: not all)


def test_cpu_malloc_changes_no_number(tmp_path) -> None:
    runs = {}
    for variant in ("system", "keep"):
        runs[variant] = tmp_path / variant
        semiseg("train", "--method", "mean_teacher", "--data", "synthetic:n_train=4,n_test=1,shape=40x40x24",
                "--labeled", "2", "--iterations", "3", "--out", str(runs[variant]), "--set", "patch_size=32,32,16",
                "--set", "n_filters=4", "--set", "num_workers=0", "--set", f"cpu_malloc={variant}", "--set",
                "device=cpu", "--quiet")
    system, keep = (torch.load(r / "checkpoint.pt", weights_only=False)["method"] for r in runs.values())
    assert system.keys() == keep.keys() and all(torch.equal(system[k], keep[k]) for k in system)
