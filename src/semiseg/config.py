"""Run configuration: common training settings plus the method's own hyper-parameters.

Precedence, lowest first: these defaults < the method's recipe < a named preset < a YAML file <
`--set key=value` and explicit CLI options. Every key is validated; a typo is an error that names it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods import get_method
from .methods.base import Method, MethodParams


class TrainConfig(BaseModel):
    """Defaults are the LA recipe shared by the papers (protocol.md section 1.3)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: str = "supervised"
    data: str = "synthetic"
    layout: str = "auto"
    labeled: int = 8
    val: int = 0
    iterations: int = 15000
    batch_labeled: int = 2
    batch_unlabeled: int = 2
    patch_size: tuple[int, ...] = (112, 112, 80)
    stride: tuple[int, ...] = (18, 18, 4)
    rot_flip: bool = True
    n_filters: int = 16
    norm: Literal["batchnorm", "instancenorm", "groupnorm", "none"] = "batchnorm"  # VNet normalisation
    dropout: float = 0.5  # VNet Dropout3d on x5 and x9 (the legacy 0.5)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    lr_schedule: Literal["constant", "poly", "step"] = "constant"
    poly_power: float = 0.9
    poly_horizon: int = 0  # "poly": iterations the decay spans, 0 = `iterations` (CrossMatch-LA: 17,000)
    lr_step: int = 2500
    lr_gamma: float = 0.1
    lr_step_start: int = 0  # "step": iterations at the base rate before the first period (BCP's pre-training)
    seed: int = 1337
    checkpoint_every: int = 1000
    log_every: int = 20
    val_every: int = 200
    val_start: int = 0  # first iteration at which validation runs (the official CAML / SSL4MIS monitors from 800)
    # best_on_test reproduces the official codes' checkpoint choice on the test set; it leaks the test set
    checkpoint_selection: Literal["last", "best_on_val", "best_on_test"] = "last"
    post_lcc: bool = False
    empty_policy: Literal["legacy_zero", "nan", "penalty"] = "legacy_zero"
    device: str = "auto"
    amp: bool = True
    # channels-last 3D layout; auto = on for 3D networks on CUDA, and on CPU for methods that measured faster
    channels_last: Literal["auto", "on", "off"] = "auto"
    cpu_bf16: bool = False  # bf16 autocast on CPU too (AVX512-BF16 / AMX); changes numerics, so off by default
    fold_bn: bool = False  # inference: BatchNorm folded into the convolution before it (rounding-level changes)
    threads: int = 0  # CPU threads of the intra-op pool; 0 = the cores this process may run on
    cudnn_benchmark: bool = True  # cuDNN autotuning on CUDA (fixed patch sizes make it pay off)
    # torch.compile of the method's networks (`Method.compiled_networks`); a torch.compile mode, or off
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    sync_bn: bool = False  # multi-GPU: synchronise BatchNorm statistics across processes (CUDA only)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/Inf loss: stop the run, or skip that update
    num_workers: int = 2
    preset: str | None = None
    params: dict[str, Any] = {}

    @field_validator("channels_last", "compile", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        # YAML reads a bare on/off as a boolean: `--set channels_last=on` means the word.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("patch_size", "stride", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace("x", ",").split(",") if v)
        return value

    @field_validator("patch_size")
    @classmethod
    def _divisible(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v <= 0 or v % 16 for v in value):
            raise ValueError("every patch size must be a positive multiple of 16 (the networks halve it four times)")
        return value

    @field_validator("iterations", "batch_labeled", "n_filters", "log_every", "checkpoint_every")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("threads")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (all the cores this process may use) or a positive thread count")
        return value

    @model_validator(mode="after")
    def _stride_fits_patch(self) -> TrainConfig:
        # A 2D patch with the 3D default stride is fine for slice-wise datasets; sliding-window inference checks
        # the axis count itself.
        if len(self.stride) == len(self.patch_size) and any(t < 1 or t > p for t, p in zip(self.stride,
                                                                                           self.patch_size)):
            raise ValueError(f"stride {self.stride} must lie between 1 and the patch size {self.patch_size} on every "
                             "axis (a larger stride leaves voxels no window covers)")
        return self

    @model_validator(mode="after")
    def _selection_has_cases(self) -> TrainConfig:
        if self.checkpoint_selection == "best_on_val" and self.val <= 0:
            raise ValueError("checkpoint_selection=best_on_val needs validation cases: pass --set val=N (cases taken "
                             "from the training list, or the dataset's declared validation list)")
        return self

    def method_class(self) -> type[Method]:
        return get_method(self.method)

    def method_params(self) -> MethodParams:
        cls = self.method_class()
        try:
            return cls.Params(**self.params)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, f"method {self.method!r} parameter")) from None


def _describe(exc: ValidationError, what: str) -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if not key:  # a check across several keys
        return f"invalid configuration: {first['msg'].removeprefix('Value error, ')}"
    return f"{what} {key!r}: {first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})"


def _coerce(text: str) -> Any:
    """`--set` values are YAML scalars or lists: 0.1, true, 64,64,48, [1, 2]."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict[str, Any], method_cls: type[Method], overrides: dict[str, Any]) -> None:
    """Route each key to the common config or to the method's parameters (`params.` prefix optional)."""
    common = set(TrainConfig.model_fields) - {"params"}
    method_keys = set(method_cls.Params.model_fields)
    for key, value in overrides.items():
        name = key.removeprefix("params.").removeprefix(f"{method_cls.name}.")
        if key in common:
            values[key] = value
        elif name in method_keys:
            values.setdefault("params", {})[name] = value
        else:
            close = difflib.get_close_matches(name, sorted(common | method_keys), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; method {method_cls.name!r} accepts "
                              f"{', '.join(sorted(method_keys)) or 'no parameters'} besides the common keys")


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set patch_size=64,64,48")
        out[key.strip()] = _coerce(value)
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message reduced to one line: what went wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def build_config(method: str | None, file: Path | None = None, overrides: dict[str, Any] | None = None,
                 preset: str | None = None) -> TrainConfig:
    """Resolve the full configuration of a run, in the documented precedence order."""
    file_values = load_yaml(file) if file else {}
    method = method or str(file_values.get("method", "supervised"))
    cls = get_method(method)
    values: dict[str, Any] = {"method": method, "params": {}}
    apply_overrides(values, cls, dict(cls.recipe))
    preset = preset or (overrides or {}).get("preset") or file_values.get("preset")
    if preset:
        if preset not in cls.presets:
            raise ConfigError(f"method {method!r} has no preset {preset!r}; presets: "
                              f"{', '.join(cls.presets) or 'none'}")
        apply_overrides(values, cls, dict(cls.presets[preset]))
        values["preset"] = preset
    params = file_values.pop("params", {}) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{file}: 'params' must be a mapping of method parameters to values")
    try:
        apply_overrides(values, cls, {k: v for k, v in file_values.items() if k != "method"})
        apply_overrides(values, cls, {f"params.{k}": v for k, v in params.items()})
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    apply_overrides(values, cls, overrides or {})
    try:
        config = TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "config key")) from None
    config.method_params()  # validate now, not at iteration 1
    return config


def scaled_schedules(method: str, iterations: int, preset: str | None = None) -> dict[str, int]:
    """Overrides that shrink every iteration-based schedule of a recipe to a shorter budget.

    Method parameters whose name ends in `iterations` or `horizon` (ramp-up epoch lengths, pre-training stages,
    threshold horizons) and the common `poly_horizon`, `lr_step` and `lr_step_start` are multiplied by
    budget / recipe iterations; schedules defined as fractions of the run follow the budget by themselves.
    Used by the demo and the LA-mini benchmark to run a recipe in minutes.
    """
    cfg = build_config(method, None, {}, preset)
    factor = iterations / cfg.iterations
    values = {name: value for name, value in cfg.method_params().model_dump().items()
              if name.endswith(("iterations", "horizon")) and isinstance(value, int) and not isinstance(value, bool)}
    values.update({"poly_horizon": cfg.poly_horizon, "lr_step_start": cfg.lr_step_start,
                   "lr_step": cfg.lr_step if cfg.lr_schedule == "step" else 0})
    return {name: max(1, round(value * factor)) for name, value in values.items() if value}
