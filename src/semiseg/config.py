"""Run configuration: common training settings plus the method's own hyper-parameters.

Precedence, lowest first: these defaults < the method's recipe < a named preset < a YAML file <
`--set key=value` and explicit CLI options. Every key is validated; a typo is an error that names it.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods import get_method
from .methods.base import Method, MethodParams


class TrainConfig(BaseModel):
    """Defaults are the LA recipe shared by the papers (protocol.md section 1.3)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    method: str = "supervised"
    """Method name (`semiseg methods`); the CLI's `train` requires it."""
    data: str = "synthetic"
    """Dataset folder (stored absolute and resolved), or synthetic[:n_train=..,n_test=..,shape=XxYxZ,seed=..]."""
    layout: str = "auto"
    """On-disk layout: auto (detected from the folder), la, pancreas, brats, acdc or nnunet."""
    labeled: int = 8
    """Labelled training cases: the first N of the training list (8 = the LA benchmark's)."""
    val: int = 0
    """Validation cases for checkpoint selection: the declared list, else the last V (labelled) training cases."""
    iterations: int = 15000
    """Training iterations (optimiser updates); a larger value with --resume extends a run."""
    batch_labeled: int = 2
    """Labelled samples per batch (per process under torchrun)."""
    batch_unlabeled: int = 2
    """Unlabelled samples per batch (per process under torchrun); 0 trains on labelled cases only."""
    patch_size: tuple[int, ...] = (112, 112, 80)
    """Training patch and sliding window, multiples of 16; unset, it follows the data (LA: 112x112x80)."""
    stride: tuple[int, ...] = (18, 18, 4)
    """Sliding-window step at evaluation; unset, it follows the data (LA: 18x18x4)."""
    rot_flip: bool = True
    """Random 90-degree rotation and flip augmentation (the legacy RandomRotFlip)."""
    n_filters: int = 16
    """Base channel count of the network (the VNet's 16)."""
    norm: Literal["batchnorm", "instancenorm", "groupnorm", "none"] = "batchnorm"
    """VNet normalisation layers."""
    dropout: float = 0.5
    """VNet Dropout3d on x5 and x9 (the legacy 0.5)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Optimiser."""
    lr: float = 0.01
    """Base learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 1e-4
    """L2 weight decay (SGD) or decoupled weight decay (AdamW)."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    lr_schedule: Literal["constant", "poly", "step"] = "constant"
    """Learning-rate schedule: constant, poly decay, or step decay."""
    poly_power: float = 0.9
    """"poly": lr = base * (1 - t / horizon) ** power."""
    poly_horizon: int = 0
    """"poly": iterations the decay spans, 0 = `iterations` (CrossMatch-LA: 17,000)."""
    poly_lag: int = Field(0, ge=0)
    """"poly": update k uses poly(max(k - 1 - lag, 0)); CrossMatch-ACDC sets the rate after each step: lag 1."""
    lr_step: int = 2500
    """"step": iterations per period of the step decay."""
    lr_gamma: float = 0.1
    """"step": factor applied to the rate at each period."""
    lr_step_start: int = 0
    """"step": iterations at the base rate before the first period (BCP's pre-training)."""
    seed: int = 1337
    """Seed of the initial weights, the batch stream and the augmentation."""
    checkpoint_every: int = 1000
    """Iterations between checkpoints (also written at the end and on Ctrl-C)."""
    log_every: int = 20
    """Iterations between log records (metrics.jsonl, TensorBoard, progress)."""
    val_every: int = 200
    """Iterations between validations (with val > 0 or best_on_test)."""
    val_start: int = 0
    """First iteration at which validation runs (the official CAML / SSL4MIS monitors from 800)."""
    checkpoint_selection: Literal["last", "best_on_val", "best_on_test"] = "last"
    """Checkpoint evaluated: last, best_on_val, or best_on_test (the official codes' quirk; leaks the test set)."""
    post_lcc: bool = False
    """Keep the largest connected component of each class at evaluation."""
    empty_policy: Literal["legacy_zero", "nan", "penalty"] = "legacy_zero"
    """Metrics of an empty prediction: legacy_zero (the papers'), nan (excluded) or penalty (image diagonal)."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    amp: bool = True
    """bf16 autocast on CUDA (on CPU only with cpu_bf16)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Channels-last 3D memory layout; auto = on for 3D networks on CUDA, and on CPU for methods that measured
    faster."""
    cpu_bf16: bool = False
    """bf16 autocast on CPU too (AVX512-BF16 / AMX); changes numerics, so off by default (stated on the card)."""
    fold_bn: bool = False
    """Inference: BatchNorm folded into the convolution before it (rounding-level changes; off by default)."""
    threads: int = 0
    """CPU threads of the intra-op pool; 0 = OMP_NUM_THREADS when set, else the cores this process may run on."""
    cpu_malloc: Literal["keep", "system"] = "keep"
    """CPU training: keep = glibc keeps freed memory for the next step (no page faults per step, the same numbers,
    a higher resident peak); system = malloc's own defaults."""
    cudnn_benchmark: bool = True
    """cuDNN autotuning on CUDA (fixed patch sizes make it pay off)."""
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """torch.compile mode of the method's networks, or off."""
    sync_bn: bool = False
    """Multi-GPU: synchronise BatchNorm statistics across processes (CUDA only)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """NaN/Inf loss: stop the run, or skip that update."""
    num_workers: int = 2
    """Batch-preparing worker processes (0 = in the training process)."""
    preset: str | None = None
    """Named preset of the method (e.g. la-8): the paper's recipe for that setting."""
    params: dict[str, Any] = {}
    """The method's own hyper-parameters (`semiseg config keys --method NAME`), all resolved in config.yaml."""

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
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable config file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return data


def saved_config(values: object, source: Path | str) -> TrainConfig:
    """The configuration a run saved (its config.yaml or a checkpoint), validated: a damaged or foreign one
    is a `ConfigError` naming `source`, never a crash."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"{source}: the saved configuration is not a mapping of keys to values; the file is "
                          "damaged or was not written by `semiseg train`")
    try:
        config = TrainConfig(**values)
        config.method_params()
    except ValidationError as exc:
        raise ConfigError(f"{source}: saved configuration: {_describe(exc, 'config key')}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: saved configuration: {exc}") from None
    return config


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
    return resolved(config)  # method parameters validated now, not at iteration 1


def resolved(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every method hyper-parameter written out at its resolved value (config.yaml shows them all)."""
    params = cfg.method_params().model_dump(mode="json")
    return cfg if params == cfg.params else cfg.model_copy(update={"params": params})


# Keys a resumed run may change without changing its recipe: where it runs and how often it reports or saves.
RESUME_FREE = ("device", "num_workers", "log_every", "checkpoint_every", "cudnn_benchmark")


def resume_config(saved: TrainConfig, typed: dict[str, Any], run: Path) -> TrainConfig:
    """The saved configuration with what the user typed on a `--resume` command line.

    Only the typed keys are compared (the defaults of options not given are not the user's), so repeating the
    original command works. A typed key that changes the recipe is refused, naming it; `iterations` may grow
    (the run is extended), `data` may name the same dataset at a new place (its fingerprint is checked by the
    trainer), and the keys of `RESUME_FREE` may change freely.
    """
    saved = resolved(saved)
    typed = dict(typed)
    changed = [f"{key} (run {getattr(saved, key)!r}, given {typed[key]!r})" for key in ("method", "preset")
               if key in typed and typed.pop(key) != getattr(saved, key)]
    values = saved.model_dump()
    apply_overrides(values, saved.method_class(), typed)
    try:
        given = resolved(TrainConfig(**values))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, "config key")) from None
    for key in TrainConfig.model_fields:
        before, after = getattr(saved, key), getattr(given, key)
        if key in (*RESUME_FREE, "data", "params") or before == after:
            continue
        if key == "iterations" and after > before:
            continue
        note = ": a run can be extended, not shortened" if key == "iterations" else ""
        changed.append(f"{key} (run {before!r}, given {after!r}{note})")
    changed += [f"{key} (run {saved.params.get(key)!r}, given {value!r})" for key, value in given.params.items()
                if saved.params.get(key) != value]
    if changed:
        raise ConfigError(f"--resume continues {run} with its saved config, but the options change "
                          f"{', '.join(changed)}; drop them, or train into a new --out")
    return given


def schedules_on_total(cfg: TrainConfig) -> list[str]:
    """Schedules of `cfg` that span the whole run, so extending the run recomputes them with the new total.

    Ramp-ups measured in epochs (`epoch_iterations`), step decays and stage switches are fixed in iterations and
    do not move.
    """
    names = ["poly learning-rate decay (poly_horizon 0)"] if cfg.lr_schedule == "poly" and not cfg.poly_horizon \
        else []
    return names + cfg.method_class().schedules_on_total(cfg.method_params())


def _type_name(annotation: Any) -> str:
    """A short, readable type for `semiseg config keys`: float, int,..., a|b|c, float or null."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args)
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return "mapping" if issubclass(annotation, BaseModel) else annotation.__name__
    return str(annotation).replace("typing.", "")


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, BaseModel):
        return str(value.model_dump(mode="json"))
    return "null" if value is None else str(value)


def config_keys(method: str | None = None) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """(section title, [(key, type, default, help)]) for the common keys and, with a method, its own parameters.

    Generated from the pydantic models, so the list cannot miss a key; with a method the common defaults are the
    method's recipe (`train` without `--preset`).
    """
    base = build_config(method) if method else TrainConfig()
    common = [(name, _type_name(field.annotation), _shown(getattr(base, name)), field.description or "")
              for name, field in TrainConfig.model_fields.items() if name != "params"]
    title = f"common keys (defaults with method {method!r}'s recipe)" if method else "common keys"
    sections = [(title, common)]
    if method:
        cls = get_method(method)
        own = [(name, _type_name(field.annotation), _shown(field.get_default(call_default_factory=True)),
                field.description or "") for name, field in cls.Params.model_fields.items()]
        sections.append((f"method {method!r} parameters (presets: {', '.join(cls.presets) or 'none'})", own))
    return sections


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
