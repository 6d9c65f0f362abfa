"""The method interface (USB style): one class per algorithm, registered by name.

A method owns its networks (and EMA teachers, memory banks: everything that is part of its state
lives in `state_dict`), declares its hyper-parameters as a pydantic model with defaults, and turns
one two-stream batch into losses in `train_step`. The trainer knows nothing about any method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..data.loader import Batch


class MethodParams(BaseModel):
    """Base of every method's hyper-parameters; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


@dataclass(frozen=True)
class NetSpec:
    """What the data fixes about a network."""

    in_channels: int = 1
    num_classes: int = 2
    spatial_dims: int = 3
    n_filters: int = 16
    norm: str = "batchnorm"
    dropout: float = 0.5


@dataclass(frozen=True)
class StepContext:
    """`iteration` counts from 1 (the first update), as the papers' ramp-ups do."""

    iteration: int
    total_iterations: int
    n_labeled_cases: int = 0


@dataclass
class StepOutput:
    """`loss` is back-propagated; `logs` are detached scalars, read by the trainer only when it logs."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Method(nn.Module, ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Training-recipe defaults (optimiser, iterations, patch...) that differ from the common LA recipe.
    recipe: ClassVar[dict[str, Any]] = {}
    # Named presets: each a dict of training-config keys and method parameters (e.g. "la-8").
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Whether `channels_last=auto` takes the channels-last 3D layout on CPU (measured per method: BENCHMARKS.md).
    cpu_channels_last: ClassVar[bool] = True

    def __init__(self, params: MethodParams, spec: NetSpec) -> None:
        super().__init__()
        self.params = params
        self.spec = spec

    def forward(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """`train_step` as the module's forward, so DistributedDataParallel can wrap a whole method."""
        return self.train_step(batch, ctx)

    @abstractmethod
    def train_step(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """Losses for one batch; called in train mode inside the trainer's autocast."""

    @abstractmethod
    def inference_network(self) -> nn.Module:
        """The network evaluated at test time; its forward returns class logits."""

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Called after each optimiser step (EMA teachers update here)."""

    @classmethod
    def schedules_on_total(cls, params: MethodParams) -> list[str]:
        """The method's schedules that span the whole run (`ctx.total_iterations`), named for the card: extending
        a run with `--resume --iterations N` recomputes them with the new total."""
        return []

    def optimizer_resets(self) -> tuple[int, ...]:
        """Iterations after which the optimiser starts afresh (momentum cleared), e.g. at a stage switch."""
        return ()

    def compiled_networks(self) -> list[nn.Module]:
        """Modules whose forward `--set compile=...` compiles: by default every child module with parameters."""
        return [m for m in self.children() if next(m.parameters(), None) is not None]

    def evaluated_output(self) -> str:
        """What `inference_network` scores, in words, for the protocol card."""
        return "the method's single network"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters given to the optimiser (EMA teachers are excluded by overriding this)."""
        return [p for p in self.parameters() if p.requires_grad]
