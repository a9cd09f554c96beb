r"""Text conditioning of SD3 / SD3.5: prompt embeddings and a cache that encodes each prompt once.

:class:`PromptEmbeds` holds what ``StableDiffusion3Pipeline.encode_prompt`` returns (and the empty
prompt's embeddings for classifier-free guidance); :class:`PromptCache` encodes each distinct prompt
once with the three text encoders, after which the encoders are not needed.

Reference: ``flowgrpo`` (CFG with the empty prompt), ``diffusionopd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["PromptEmbeds", "PromptCache"]

@dataclass
class PromptEmbeds:
    r"""Text conditioning :math:`c` of a batch of prompts, as ``StableDiffusion3Pipeline.encode_prompt``
    returns it; the negative fields are the unconditional :math:`\varnothing` of CFG (``flowgrpo``).

    Attributes:
        prompt_embeds: ``(B, L, D)`` CLIP (padded) and T5 token embeddings, concatenated on ``L``.
        pooled_prompt_embeds: ``(B, P)`` the two CLIP pooled projections concatenated.
        negative_prompt_embeds: ``(B, L, D)`` embeddings of the empty prompt (CFG), or ``None``.
        negative_pooled_prompt_embeds: ``(B, P)`` or ``None``.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    negative_prompt_embeds: Optional[Tensor] = None
    negative_pooled_prompt_embeds: Optional[Tensor] = None

    def __post_init__(self) -> None:
        b = self.prompt_embeds.shape[0]
        for name in ("pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != b:
                raise ValueError(
                    f"PromptEmbeds.{name} must have batch size {b} like prompt_embeds, got shape {tuple(t.shape)}"
                )
        if (self.negative_prompt_embeds is None) != (self.negative_pooled_prompt_embeds is None):
            raise ValueError("PromptEmbeds: give both negative embeddings or neither")

    @property
    def batch_size(self) -> int:
        return int(self.prompt_embeds.shape[0])

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(*(None if t is None else fn(t) for t in self._fields()))

    def _fields(self):
        return (
            self.prompt_embeds,
            self.pooled_prompt_embeds,
            self.negative_prompt_embeds,
            self.negative_pooled_prompt_embeds,
        )

    def select(self, idx) -> "PromptEmbeds":
        """Rows ``idx`` (int, slice, list or index tensor) of every field; an int keeps the batch dim."""
        if isinstance(idx, int):
            idx = [idx]
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t[idx])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEmbeds":
        """Move every field to ``device`` and/or cast to ``dtype``."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        """Each row repeated ``n`` times in place (``[p0, p0, p1, p1, ...]`` for ``n = 2``): a group of
        ``n`` rollouts per prompt."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch dimension."""
        if not parts:
            raise ValueError("PromptEmbeds.cat needs at least one part")
        fields = list(zip(*(p._fields() for p in parts)))
        return PromptEmbeds(*(None if f[0] is None else torch.cat(f, dim=0) for f in fields))


class PromptCache:
    r"""Encode prompts once with the pipeline's three text encoders and keep the embeddings
    :math:`c = [\mathrm{pad}(\mathrm{CLIP_L} \| \mathrm{CLIP_G});\ \mathrm{T5}]` (tokens) and
    :math:`[\mathrm{pool}_L \| \mathrm{pool}_G]` (pooled).

    Each distinct prompt is encoded once (text encoders under ``no_grad``); later calls assemble the
    batch from the cache.  With ``guidance=True`` the negative (empty) prompt is encoded once as well,
    as ``StableDiffusion3Pipeline`` does for classifier-free guidance.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
        guidance: also provide the negative embeddings (needed for CFG, ``guidance_scale != 1``).
        negative_prompt: the unconditional prompt (default ``""``, as the pipeline).
        batch_size: prompts per text-encoder call when many new prompts arrive at once (a progress bar
            shows when there is more than one batch).

    Reference: ``flowgrpo`` (CFG with the empty prompt during rollouts).
    """

    def __init__(
        self,
        pipe,
        max_sequence_length: int = 256,
        guidance: bool = True,
        negative_prompt: str = "",
        batch_size: int = 32,
    ):
        for name, value in (("max_sequence_length", max_sequence_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.batch_size = batch_size
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance = bool(guidance)
        self.negative_prompt = negative_prompt
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._negative: Optional[tuple[Tensor, Tensor]] = None

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings of ``prompts`` (a list of ``B`` strings), from the cache where possible.

        Returns:
            :class:`PromptEmbeds` with batch ``B`` (negative fields set when ``guidance``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must all be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        starts = range(0, len(new), self.batch_size)
        if len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding prompts", unit="batch")
        for start in starts:
            chunk = new[start : start + self.batch_size]
            embeds, pooled = self._encode(chunk)
            for i, p in enumerate(chunk):
                self._cache[p] = (embeds[i : i + 1].clone(), pooled[i : i + 1].clone())
        pos = torch.cat([self._cache[p][0] for p in prompts], dim=0)
        pooled = torch.cat([self._cache[p][1] for p in prompts], dim=0)
        if not self.guidance:
            return PromptEmbeds(pos, pooled)
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt])
        neg, neg_pooled = self._negative
        b = len(prompts)
        return PromptEmbeds(pos, pooled, neg.expand(b, -1, -1), neg_pooled.expand(b, -1))
