r"""Prompt datasets in the formats users have, with the per-prompt metadata a reward needs.

Formats (chosen by the file's suffix):

* ``.jsonl``: one JSON object per line with a string ``"prompt"``; the whole object is the prompt's
  metadata.  Flow-GRPO's GenEval split (``geneval/train_metadata.jsonl``, ``test_metadata.jsonl``)
  is of this form, each line ``{"tag": "counting", "include": [{"class": "dog", "count": 2}],
  "prompt": "a photo of two dogs", ...}``: the GenEval reward reads ``tag`` and ``include`` (and
  ``exclude`` where present) from the metadata.
* anything else (``.txt``): one prompt per non-blank line, stripped; the metadata of each is ``{}``.
  Flow-GRPO's OCR split (``ocr/train.txt``, ``test.txt``; the text to render in quotes inside the
  prompt) and pickscore split (``pickscore/train.txt``) are of this form.

A reward receives the metadata of its batch as ``reward(images, prompts, metadata)`` (see
:mod:`scale.rewards`); a batch's prompts travel as a :class:`PromptBatch`, a list of strings that
also carries their metadata.

Reference: ``flowgrpo`` (``TextPromptDataset`` and ``GenevalPromptDataset`` of its training script).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

__all__ = ["PromptSet", "PromptBatch", "load_prompts"]


@dataclass
class PromptSet:
    r"""The prompts :math:`c_i` of a file and their metadata :math:`m_i` (``flowgrpo``).

    .. math:: \{(c_i, m_i)\}_{i=1}^N

    Attributes:
        prompts: ``N`` prompts.
        metadata: ``N`` dicts (``{}`` for a plain-text file; the whole JSON line for ``.jsonl``).
        path: the file they came from.
    """

    prompts: List[str]
    metadata: List[Dict[str, Any]] = field(default_factory=list)
    path: str = ""

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"PromptSet needs one metadata dict per prompt ({len(self.prompts)}), "
                             f"got {len(self.metadata)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: Iterable[int]) -> "PromptBatch":
        """The prompts and metadata at ``indices`` as a :class:`PromptBatch`."""
        idx = list(indices)
        return PromptBatch([self.prompts[i] for i in idx], [self.metadata[i] for i in idx])


class PromptBatch(list):
    r"""The ``B`` prompts of a batch (a ``list`` of ``str``, so it goes wherever a prompt list goes)
    and their metadata (``flowgrpo``).

    .. math:: (c_b, m_b)_{b=1}^B

    Args:
        prompts: ``B`` strings.
        metadata: ``B`` dicts (default ``{}`` each).

    Attributes:
        metadata: the ``B`` dicts.
    """

    def __init__(self, prompts: Sequence[str], metadata: Optional[Sequence[Dict[str, Any]]] = None):
        super().__init__(prompts)
        self.metadata = [{} for _ in self] if metadata is None else list(metadata)
        if len(self.metadata) != len(self):
            raise ValueError(f"PromptBatch needs one metadata dict per prompt ({len(self)}), got {len(self.metadata)}")


def load_prompts(path: str | os.PathLike, what: str = "prompts") -> PromptSet:
    r"""Read a prompt file: ``.jsonl`` (one object with a ``"prompt"`` per line, the object is the
    metadata) or plain text (one prompt per non-blank line, metadata ``{}``) (``flowgrpo`` splits).

    .. math:: \text{file} \mapsto \{(c_i, m_i)\}_{i=1}^N,\ N \ge 1

    Args:
        path: the file.
        what: its role in messages (e.g. ``"task 'ocr'"``).

    Returns:
        :class:`PromptSet`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no prompt in it; a ``.jsonl`` line that is not a JSON object with a non-empty
            string ``"prompt"`` (the line number and its start are named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file for {what} not found: {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    prompts: List[str] = []
    metadata: List[Dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for num, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"prompt file for {what}: {str(path)!r} line {num} is not JSON ({err}): "
                                 f"{line[:80]!r}") from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt file for {what}: {str(path)!r} line {num} must be a JSON object with a "
                                 f"non-empty string \"prompt\", got {line[:80]!r}")
            prompts.append(prompt.strip())
            metadata.append(obj)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file for {what} is empty (no non-blank line): {str(path)!r}")
    return PromptSet(prompts, metadata, str(path))
