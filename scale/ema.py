r"""Exponential moving average of the student LoRA (optional; ``ema_decay > 0``).

After each stage-2 optimiser step, for every LoRA tensor :math:`\theta` of the student adapter,

.. math:: \bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta,\qquad \bar\theta_0 = \theta_0

kept in float32 on the parameters' device.  :meth:`LoraEMA.applied` swaps the averages into the
student's parameters for evaluation and sampling and restores the trained values afterwards;
:meth:`LoraEMA.state_dict` goes into each checkpoint, so a resumed run continues the same average
bit for bit.

Reference: ``flowgrpo`` (EMA of the LoRA, decay 0.9), ``nft``.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping

import torch

__all__ = ["LoraEMA"]


class LoraEMA:
    r"""The EMA :math:`\bar\theta \leftarrow d\bar\theta + (1-d)\theta` of the named LoRA tensors of one adapter.

    Args:
        params: ``{name: parameter}`` of the adapter (e.g. every ``lora_`` tensor of ``"student"``).
        decay: :math:`d \in [0, 1)`.

    Reference: ``flowgrpo``.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"LoraEMA decay must lie in [0, 1), got {decay!r}")
        if not params:
            raise ValueError("LoraEMA: no parameters (the adapter has no LoRA tensor)")
        self.params = dict(params)
        self.decay = float(decay)
        self.shadow: Dict[str, torch.Tensor] = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        r""":math:`\bar\theta \leftarrow d\bar\theta + (1-d)\theta` for every tensor (after an optimiser step)."""
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the averages; afterwards their trained values again."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> Dict[str, object]:
        """The averages (CPU copies), the decay and the number of updates."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: t.detach().cpu().clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict` exactly.

        Raises:
            ValueError: a different decay, or tensors whose names or shapes do not match.
        """
        if float(state["decay"]) != self.decay:
            raise ValueError(f"LoraEMA: the checkpoint's decay {state['decay']!r} differs from {self.decay!r}")
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise ValueError(f"LoraEMA: checkpoint tensors {sorted(set(shadow) ^ set(self.shadow))[:4]} do not match")
        for n, t in shadow.items():
            if tuple(t.shape) != tuple(self.shadow[n].shape):
                raise ValueError(f"LoraEMA: tensor {n} has shape {tuple(t.shape)}, expected {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(t.to(self.shadow[n].device))
        self.num_updates = int(state["num_updates"])
