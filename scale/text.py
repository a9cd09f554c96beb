r"""Text conditioning of SD3 / SD3.5: prompt embeddings and a cache that encodes each prompt once.

:class:`PromptEmbeds` holds what ``StableDiffusion3Pipeline.encode_prompt`` returns (and the empty
prompt's embeddings for classifier-free guidance); :class:`PromptCache` encodes each distinct prompt
once with the three text encoders, after which the encoders are not needed.

The cache lives on the host, never on the GPU: in (pinned, when CUDA is available) CPU memory, or in
a memory-mapped cache directory on disk (:meth:`PromptCache.attach`) written once and read by later
runs.  A batch's rows are gathered on the host and moved to the device per micro-batch by
:func:`scale.pipeline.model_inputs`.  (Flow-GRPO's pickscore split, 25,432 prompts at 1.68 MB each in
bf16 with 128 T5 tokens, is 42.8 GB: too much for every GPU.)

Reference: ``flowgrpo`` (CFG with the empty prompt), ``diffusionopd``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["PromptEmbeds", "PromptCache", "CACHE_INDEX"]

#: the commit marker of an on-disk prompt cache (written last)
CACHE_INDEX = "index.json"
_PROBE = "a photo of an opd_ref cache probe"

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
    :math:`[\mathrm{pool}_L \| \mathrm{pool}_G]` (pooled) on the host.

    Each distinct prompt is encoded once (text encoders under ``no_grad``); later calls assemble the
    batch from the cache, on the CPU (in pinned memory when ``pin_memory``, so the copy to the GPU is
    asynchronous).  With ``guidance=True`` the negative (empty) prompt is encoded once as well, as
    ``StableDiffusion3Pipeline`` does for classifier-free guidance.  :meth:`attach` backs the cache
    by a memory-mapped directory on disk instead of memory.

    Args:
        pipe: a ``StableDiffusion3Pipeline``.
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
        guidance: also provide the negative embeddings (needed for CFG, ``guidance_scale != 1``).
        negative_prompt: the unconditional prompt (default ``""``, as the pipeline).
        batch_size: prompts per text-encoder call when many new prompts arrive at once (a progress bar
            shows when there is more than one batch).
        pin_memory: keep the host tensors pinned (default: when CUDA is available).

    Reference: ``flowgrpo`` (CFG with the empty prompt during rollouts).
    """

    def __init__(
        self,
        pipe,
        max_sequence_length: int = 256,
        guidance: bool = True,
        negative_prompt: str = "",
        batch_size: int = 32,
        pin_memory: Optional[bool] = None,
    ):
        for name, value in (("max_sequence_length", max_sequence_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.batch_size = batch_size
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance = bool(guidance)
        self.negative_prompt = negative_prompt
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._index: Dict[str, Tuple[int, int]] = {}  # prompt -> (block, row)
        self._blocks: List[Tuple[Tensor, Tensor]] = []  # (embeds (n, L, D), pooled (n, P)) on the host
        self._negative: Optional[tuple[Tensor, Tensor]] = None

    def __len__(self) -> int:
        return len(self._index)

    @property
    def blocks(self) -> List[Tuple[Tensor, Tensor]]:
        """The host tensors that hold the cache: ``(embeds (n, L, D), pooled (n, P))`` per block."""
        return list(self._blocks)

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

    def _host(self, t: Tensor) -> Tensor:
        t = t.detach().to("cpu").contiguous()
        return t.pin_memory() if self.pin_memory else t

    def _add_block(self, embeds: Tensor, pooled: Tensor, prompts: Sequence[str]) -> None:
        self._blocks.append((embeds, pooled))
        k = len(self._blocks) - 1
        for row, p in enumerate(prompts):
            self._index[p] = (k, row)

    def _encode_new(self, prompts: Sequence[str]) -> None:
        new = list(dict.fromkeys(p for p in prompts if p not in self._index))
        starts = range(0, len(new), self.batch_size)
        if len(starts) > 1:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (it would nest inside the training bar
            # and leave cursor-up codes in a redirected log)
            starts = tqdm(starts, desc="encoding prompts", unit="batch", leave=False, disable=None)
        for start in starts:
            chunk = new[start : start + self.batch_size]
            embeds, pooled = self._encode(chunk)
            self._add_block(self._host(embeds), self._host(pooled), chunk)

    def _gather(self, k: int, prompts: Sequence[str]) -> Tensor:
        parts = [self._blocks[self._index[p][0]][k][self._index[p][1]].unsqueeze(0) for p in prompts]
        if not self.pin_memory:
            return torch.cat(parts, dim=0)
        out = torch.empty((len(parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True)
        return torch.cat(parts, dim=0, out=out)

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeddings of ``prompts`` (a list of ``B`` strings), from the cache where possible.

        Returns:
            :class:`PromptEmbeds` with batch ``B`` on the CPU (negative fields set when ``guidance``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must all be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        self._encode_new(prompts)
        pos, pooled = self._gather(0, prompts), self._gather(1, prompts)
        if not self.guidance:
            return PromptEmbeds(pos, pooled)
        if self._negative is None:
            neg, neg_pooled = self._encode([self.negative_prompt])
            self._negative = (self._host(neg), self._host(neg_pooled))
        neg, neg_pooled = self._negative
        b = len(prompts)
        return PromptEmbeds(pos, pooled, neg.expand(b, -1, -1), neg_pooled.expand(b, -1))

    # ---- a memory-mapped cache on disk -----------------------------------------------------------
    def attach(self, directory: str | os.PathLike, prompts: Sequence[str], rank: int = 0, world: int = 1,
               barrier: Optional[Callable[[], None]] = None) -> bool:
        r"""Back the cache of ``prompts`` by a memory-mapped directory, writing it first when absent:
        process ``rank`` of ``world`` encodes rows ``rank, rank + world, ...`` into the shared files
        (the directory must be on a file system every process sees), the main process writes
        :data:`CACHE_INDEX` last, and every process then maps the files read-only.  A later run with
        the same text encoders reads it without encoding (prompts it lacks are encoded into memory).

        .. math:: c_i\ \text{at row } i \text{ of } \texttt{embeds.bin},\ \ i \equiv r \pmod W \text{ written by process } r

        Args:
            directory: the cache directory (created).
            prompts: the prompts to cache (duplicates ignored; their order fixes the rows).
            rank: this process; world: the number of processes.
            barrier: waits for every process (``accelerator.wait_for_everyone``; ``None`` on one process).

        Returns:
            ``True`` when the cache was written now, ``False`` when an existing one was read.

        Raises:
            ValueError: the directory holds a cache of other text encoders or settings (named), or
                ``rank`` / ``world`` are inconsistent.
        """
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
            raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
        barrier = barrier or (lambda: None)
        path = Path(directory)
        prompts = list(dict.fromkeys(prompts))
        wrote = False
        if not (path / CACHE_INDEX).is_file():
            wrote = True
            if rank == 0:
                self.prepare_disk(path, prompts)
            barrier()
            self.write_disk_shard(path, prompts, rank, world)
            barrier()
            if rank == 0:
                self.commit_disk(path, prompts)
            barrier()
        self.open_disk(path)
        self._encode_new(prompts)  # what an older cache lacks, in memory
        return wrote

    def _probe(self) -> Tuple[Tensor, Tensor]:
        embeds, pooled = self._encode([_PROBE])
        return embeds.detach().cpu(), pooled.detach().cpu()

    def prepare_disk(self, path: Path, prompts: Sequence[str]) -> None:
        """Main process, first phase of :meth:`attach`: size the files (shapes from the probe prompt)."""
        path.mkdir(parents=True, exist_ok=True)
        (path / CACHE_INDEX).unlink(missing_ok=True)
        embeds, pooled = self._probe()
        torch.save({"embeds": embeds, "pooled": pooled, "max_sequence_length": self.max_sequence_length},
                   path / "probe.pt")
        for name, t in (("embeds", embeds), ("pooled", pooled)):
            with open(path / f"{name}.bin", "wb") as fh:
                fh.truncate(len(prompts) * t[0].numel() * t.element_size())

    def _shapes(self, path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
        probe = torch.load(path / "probe.pt", weights_only=True)
        return {k: (tuple(probe[k].shape[1:]), probe[k].dtype) for k in ("embeds", "pooled")}

    def write_disk_shard(self, path: Path, prompts: Sequence[str], rank: int = 0, world: int = 1) -> None:
        """Every process, second phase of :meth:`attach`: encode rows ``rank::world`` into the files."""
        shapes = self._shapes(path)
        n = len(prompts)
        maps = {k: torch.from_file(str(path / f"{k}.bin"), shared=True, size=n * _numel(shape), dtype=dtype)
                .view(n, *shape) for k, (shape, dtype) in shapes.items()}
        rows = list(range(rank, n, world))
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            embeds, pooled = self._encode([prompts[i] for i in chunk])
            idx = torch.tensor(chunk)
            maps["embeds"][idx] = embeds.detach().cpu().to(shapes["embeds"][1])
            maps["pooled"][idx] = pooled.detach().cpu().to(shapes["pooled"][1])
        del maps  # unmap: the pages are in the file

    def commit_disk(self, path: Path, prompts: Sequence[str]) -> None:
        """Main process, third phase of :meth:`attach`: write the index (the commit marker) atomically."""
        shapes = self._shapes(path)
        index = {"format": 1, "prompts": list(prompts), "max_sequence_length": self.max_sequence_length,
                 "fields": {k: {"shape": [len(prompts), *shape], "dtype": str(dtype).replace("torch.", "")}
                            for k, (shape, dtype) in shapes.items()}}
        tmp = path / (CACHE_INDEX + ".tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path / CACHE_INDEX)

    def open_disk(self, path: Path) -> None:
        """Map a committed cache read-only and add its rows (checked against this pipeline first).

        Raises:
            ValueError: another ``max_sequence_length`` or text encoders whose embedding of the probe
                prompt differs from the stored one (the directory is named).
        """
        index = json.loads((path / CACHE_INDEX).read_text())
        if index.get("max_sequence_length") != self.max_sequence_length:
            raise ValueError(f"prompt cache {str(path)!r} was written with max_sequence_length "
                             f"{index.get('max_sequence_length')}, this run uses {self.max_sequence_length}: "
                             "delete it or choose another prompt_cache directory")
        stored = torch.load(path / "probe.pt", weights_only=True)
        now = self._probe()
        for k, t in zip(("embeds", "pooled"), now):
            ref = stored[k].float()
            if ref.shape != t.shape or float((t.float() - ref).abs().max()) > 1e-2 * float(ref.abs().max()) + 1e-6:
                raise ValueError(f"prompt cache {str(path)!r} was written by other text encoders or dtype (its probe "
                                 f"prompt's {k} differ): delete it or choose another prompt_cache directory")
        fields = {}
        for k, spec in index["fields"].items():
            shape, dtype = tuple(spec["shape"]), getattr(torch, spec["dtype"])
            fields[k] = torch.from_file(str(path / f"{k}.bin"), shared=False, size=_numel(shape), dtype=dtype).view(shape)
        self._add_block(fields["embeds"], fields["pooled"], index["prompts"])


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
