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
import math
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref.engine import Collective
from scale.lora import lora_parameters, switch_adapter
from scale.pipeline import ModelInputs, velocity

__all__ = ["SD3Policy", "AccelerateCollective"]


class SD3Policy:
    r"""The engine's :class:`~opd_ref.engine.Policy` for an SD3 / SD3.5 transformer with LoRA adapters.

    .. math::
        v_A(x, \sigma, c) = v(x, \sigma, \varnothing) + g_A\,\big(v(x, \sigma, c) - v(x, \sigma, \varnothing)\big)
        \quad\text{with adapter } A \text{ active}

    Guidance per role: ``guidance`` maps each adapter name (``None``: the reference) to its scale
    :math:`g_A \ge 0`, e.g. the student at 4.5, a DiffusionNFT teacher at 1 (trained without CFG:
    one conditional forward), a GRPO-Guard / Flow-GRPO teacher at 4.5.  Without a map every role uses
    the scale of the batch's :class:`~scale.pipeline.ModelInputs`.  ``detach_uncond`` stops the
    gradient through the unconditional branch (Flow-GRPO's training code); by default the gradient is
    the exact one through both branches.

    Args:
        transformer: ``SD3Transformer2DModel`` carrying the adapters.
        event_shape: ``(C, H, W)`` latent shape.
        device: the transformer's device.
        dtype: the transformer's dtype (looked up once here: ``transformer.dtype`` walks every module).
        guidance: ``{adapter or None: g}`` or ``None`` (the inputs' scale for every role).
        detach_uncond: Flow-GRPO's detached unconditional branch.

    Attributes:
        state_dtype: ``torch.float32`` (kernels and stored states are float32).
        needs_uncond: whether some role guides (``g != 1``): batches must carry the unconditional rows.

    Raises:
        ValueError: a scale that is not a finite number ``>= 0`` (named with its role).

    Reference: ``diffusionopd``, ``flowgrpo``, ``nft`` (CFG-free DiffusionNFT teachers).
    """

    state_dtype = torch.float32

    def __init__(self, transformer, event_shape: Tuple[int, ...], device: torch.device, dtype: torch.dtype,
                 guidance: Optional[Mapping[Optional[str], float]] = None, detach_uncond: bool = False):
        self.transformer = transformer
        self.event_shape = tuple(event_shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self._params: Dict[str, List[torch.nn.Parameter]] = {}
        if guidance is not None:
            guidance = dict(guidance)
            for role, g in guidance.items():
                if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                    raise ValueError(f"guidance scale of {role or 'the reference'!r} must be a finite number >= 0, "
                                     f"got {g!r}")
            guidance = {role: float(g) for role, g in guidance.items()}
        self.guidance = guidance
        self.detach_uncond = bool(detach_uncond)
        self.needs_uncond = guidance is None or any(g != 1.0 for g in guidance.values())
        self._active: Optional[str] = None

    def velocity(self, x: Tensor, sigma: float, cond: ModelInputs) -> Tensor:
        """``(B, C, H, W)`` float32 CFG velocity of the active adapter at its role's scale (no
        validation: hot loop)."""
        g = cond.guidance_override
        if g is None and self.guidance is not None:
            g = self.guidance[self._active]
        return velocity(self.transformer, x, sigma, cond, self.dtype, guidance_scale=g,
                        detach_uncond=self.detach_uncond)

    def add_role(self, adapter: str, g: float) -> None:
        """Give an adapter loaded after construction (e.g. a saved student for evaluation) its guidance
        scale :math:`g \\ge 0` (no-op without a guidance map: every role uses the inputs' scale)."""
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance scale of {adapter!r} must be a finite number >= 0, got {g!r}")
        if self.guidance is not None:
            self.guidance[adapter] = float(g)
            self.needs_uncond = self.needs_uncond or float(g) != 1.0

    def with_guidance(self, cond: ModelInputs, w: float) -> ModelInputs:
        r"""The same batch under CFG scale :math:`w > 1`: :math:`v_\varnothing + w\,(v_c - v_\varnothing)`
        (CRD's CFG-guided reference) for whichever adapter is active, overriding the per-role scales;
        needs the batch's ``[uncond; cond]`` rows."""
        if not cond.has_uncond or not w > 1:
            raise ValueError(f"with_guidance needs a batch with the unconditional rows (some role guided) and w > 1, "
                             f"got has_uncond={cond.has_uncond}, w={w}")
        return dataclasses.replace(cond, guidance_override=float(w))

    @contextlib.contextmanager
    def active(self, adapter: Optional[str]) -> Iterator[None]:
        """Make ``adapter`` (``None``: the reference) active for the block; lazy (see the module docs)."""
        if self.guidance is not None and adapter not in self.guidance:
            raise ValueError(f"adapter {adapter!r} has no guidance scale; roles: {sorted(map(str, self.guidance))}")
        switch_adapter(self.transformer, adapter)
        self._active = adapter
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
