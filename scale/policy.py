r"""SD3 / SD3.5 with LoRA adapters as an engine policy, and the ``accelerate`` collective.

:class:`SD3Policy` is all the engine (``opd_ref.engine``) sees of the model: the CFG velocity of the
active adapter at ``(x, sigma)`` for a batch's :class:`~scale.pipeline.ModelInputs`, a context in
which an adapter is active (``None``: the reference, the frozen base with adapters disabled), and
the LoRA parameters of an adapter.  States and velocities are float32 whatever the weights' dtype.

``active(adapter)`` switches *lazily*: it makes ``adapter`` active (a no-op when it already is) and
does not switch back on exit.  So a trained step's adapter stays active until the engine has run that
step's backward, and a forward that gradient checkpointing recomputes during backward sees the same
adapter as the first one; a rollout of the student followed by its trained steps switches once.

Reference: ``diffusionopd`` (student and teachers as LoRA adapters on one frozen base), ``flowgrpo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref.engine import Collective
from scale.lora import lora_parameters, switch_adapter
from scale.pipeline import ModelInputs, velocity

__all__ = ["SD3Policy", "AccelerateCollective"]


class SD3Policy:
    r"""The engine's :class:`~opd_ref.engine.Policy` for an SD3 / SD3.5 transformer with LoRA adapters.

    .. math::
        v_A(x, \sigma, c) = v(x, \sigma, \varnothing) + g\,\big(v(x, \sigma, c) - v(x, \sigma, \varnothing)\big)
        \quad\text{with adapter } A \text{ active}

    Args:
        transformer: ``SD3Transformer2DModel`` carrying the adapters.
        event_shape: ``(C, H, W)`` latent shape.
        device: the transformer's device.
        dtype: the transformer's dtype (looked up once here: ``transformer.dtype`` walks every module).

    Attributes:
        state_dtype: ``torch.float32`` (kernels and stored states are float32).

    Reference: ``diffusionopd``, ``flowgrpo``.
    """

    state_dtype = torch.float32

    def __init__(self, transformer, event_shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.transformer = transformer
        self.event_shape = tuple(event_shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._params: Dict[str, List[torch.nn.Parameter]] = {}

    def velocity(self, x: Tensor, sigma: float, cond: ModelInputs) -> Tensor:
        """``(B, C, H, W)`` float32 CFG velocity of the active adapter (no validation: hot loop)."""
        return velocity(self.transformer, x, sigma, cond, self.dtype)

    def with_guidance(self, cond: ModelInputs, w: float) -> ModelInputs:
        r"""The same batch under CFG scale :math:`w > 1`: :math:`v_\varnothing + w\,(v_c - v_\varnothing)`
        (CRD's CFG-guided reference); needs the batch's ``[uncond; cond]`` rows."""
        if not cond.cfg or not w > 1:
            raise ValueError(f"with_guidance needs a CFG batch (guidance_scale > 1) and w > 1, got "
                             f"guidance_scale={cond.guidance_scale}, w={w}")
        return dataclasses.replace(cond, guidance_scale=float(w))

    @contextlib.contextmanager
    def active(self, adapter: Optional[str]) -> Iterator[None]:
        """Make ``adapter`` (``None``: the reference) active for the block; lazy (see the module docs)."""
        switch_adapter(self.transformer, adapter)
        yield

    def trainable_parameters(self, adapter: str) -> Sequence[torch.nn.Parameter]:
        """The LoRA parameters of ``adapter`` (cached: walking ``named_parameters`` is slow)."""
        if adapter not in self._params:
            self._params[adapter] = lora_parameters(self.transformer, adapter)
        return self._params[adapter]


class AccelerateCollective(Collective):
    """Sums gradients (one all-reduce of a flat float32 buffer) and statistics over the processes of
    an ``accelerate.Accelerator``; a no-op on one process.

    Args:
        accelerator: the run's ``Accelerator``.
    """

    def __init__(self, accelerator):
        self.acc = accelerator

    def sync_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over processes in place (``p.grad`` already set on every parameter)."""
        if self.acc.num_processes == 1:
            return
        flat = self.acc.reduce(torch.cat([p.grad.reshape(-1).float() for p in params]), reduction="sum")
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def reduce(self, stats: Dict[str, float]) -> Dict[str, float]:
        """Sum every statistic over processes."""
        if self.acc.num_processes == 1 or not stats:
            return dict(stats)
        keys = sorted(stats)
        vec = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        return {k: float(v) for k, v in zip(keys, self.acc.reduce(vec, reduction="sum").tolist())}
