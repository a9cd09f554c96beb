r"""What a model must provide to the engine: the policy protocol, rollout batches, collectives.

The engine never touches a model directly.  A *policy* is anything with

* ``velocity(x, sigma, cond) -> v``: the velocity of the **active** adapter at ``(x, sigma)`` under
  condition ``cond`` (a task index for the toys, prompt embeddings for SD3.5);
* ``active(adapter)``: a context manager in which ``adapter`` is active (``None`` = the reference,
  i.e. the frozen base with every adapter disabled);
* ``trainable_parameters(adapter)``: the parameters an update of ``adapter`` trains;
* ``event_shape``, ``device``, ``state_dtype``: the shape, device and dtype of a state.

Adapters are names: ``"student"``, a teacher per task, ``None`` for the reference.  The engine keeps
the trained adapter active until the backward of each trained step has run, so a policy that
recomputes its forward during backward (gradient checkpointing) recomputes it with the same adapter.

Reference: ``diffusionopd`` (student and teachers as LoRA adapters on one frozen base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ContextManager, Dict, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Policy", "RolloutBatch", "Collective", "LOCAL", "initial_noise"]


@runtime_checkable
class Policy(Protocol):
    r"""The engine's view of a model: velocities of named adapters, their parameters, an active context.

    .. math:: v_{adapter}(x, \sigma, c)

    Attributes:
        event_shape: the shape of one state (``(2,)``, ``(C, H, W)``).
        device: where states live.
        state_dtype: the dtype of states (float64 toys, float32 SD3.5).

    Reference: ``diffusionopd`` (LoRA adapters on one frozen base).
    """

    event_shape: Tuple[int, ...]
    device: torch.device
    state_dtype: torch.dtype

    def velocity(self, x: Tensor, sigma: float, cond: Any) -> Tensor:
        """``(B, *event)`` velocity of the active adapter at ``(x, sigma)`` under ``cond``."""
        ...

    def active(self, adapter: Optional[str]) -> ContextManager:
        """A context in which ``adapter`` (``None``: the reference) is active."""
        ...

    def trainable_parameters(self, adapter: str) -> Sequence[torch.nn.Parameter]:
        """The parameters an update of ``adapter`` trains."""
        ...


@dataclass(frozen=True)
class RolloutBatch:
    r"""One batch of rollouts to draw: its condition, size, noise generator and weight.

    .. math:: \textstyle\sum_b w_b = 1 \text{ over a task's batches on all processes}

    Reference: ``diffusionopd``.

    Attributes:
        cond: the condition passed to ``policy.velocity`` (a task index, prompt embeddings, ...).
        size: number of rollouts ``B``.
        generator: draws the initial noise and then the step noise (on the policy's device).
        weight: this batch's share :math:`w_b` of its task's (or group set's) sample average,
            :math:`\sum_b w_b = 1` over all batches of the task on all processes (e.g. ``B / total``).
        meta: what a reward needs besides the final states (e.g. the ``B`` prompts); the engine
            passes it on untouched (``reward(final_states, batch)`` reads ``batch.meta``).
    """

    cond: Any
    size: int
    generator: Optional[torch.Generator] = None
    weight: float = 1.0
    meta: Any = None


def initial_noise(policy: Policy, batch: RolloutBatch) -> Tensor:
    r"""The initial noise of a batch, in the policy's state dtype, from the batch's generator.

    .. math:: x_0 \sim \mathcal N(0, I)

    Args:
        policy: gives ``event_shape``, ``device``, ``state_dtype``.
        batch: gives ``size`` and ``generator``.

    Returns:
        ``(B, *event)``.

    Reference: ``flowgrpo``.
    """
    return torch.randn((batch.size,) + tuple(policy.event_shape), generator=batch.generator,
                       device=policy.device, dtype=policy.state_dtype)


class Collective:
    r"""How an update combines processes: sum gradients and statistics (no-op on one process).

    .. math:: g = \textstyle\sum_{p} g_p

    Reference: ``diffusionopd`` (data-parallel training).

    Data-parallel callers (``scale`` through ``accelerate``) override both methods.
    """

    def sync_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over processes in place (here: one process, nothing to do)."""

    def reduce(self, stats: Dict[str, float]) -> Dict[str, float]:
        """Sum statistics over processes (here: unchanged)."""
        return dict(stats)


LOCAL = Collective()
