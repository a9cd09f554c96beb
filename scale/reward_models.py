r"""Reward adapters on the user's local reward-model directories, loaded with ``transformers`` only
(``local_files_only=True``: nothing is downloaded), and Flow-GRPO's OCR / GenEval rewards around the
user's own recogniser / evaluator.

CLIP rewards (a directory that ``CLIPModel.from_pretrained`` and ``CLIPProcessor.from_pretrained``
load: the model's ``config.json`` and weights, ``preprocessor_config.json`` and the tokenizer files).
With :math:`e_I = \mathrm{proj}_I(\mathrm{ViT}(x))`, :math:`e_T = \mathrm{proj}_T(\mathrm{Text}(c))` and
:math:`\cos = \langle e_I, e_T\rangle / (\|e_I\|\,\|e_T\|)`:

* ``pickscore`` (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``, a CLIP ViT-H/14; its processor
  is the one of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: save both into the directory):
  :math:`r = \exp(\text{logit\_scale})\cos` (the PickScore code's ``logit_scale.exp() * cos``; Flow-GRPO
  divides it by 26, a constant that group-normalised advantages do not see);
* ``hpsv2`` (Wu et al. 2023, HPSv2 and HPSv2.1): :math:`r = \cos` (the HPSv2 code's
  ``image_features @ text_features.T``).  HPSv2's released checkpoints are ``open_clip`` ViT-H/14 state
  dicts; the directory must hold them converted to a ``transformers`` ``CLIPModel`` (the suite ships
  no converter);
* ``clipscore`` (Hessel et al. 2021): :math:`r = 2.5 \max(\cos, 0)` with the caption prefixed by
  ``"A photo depicts "`` (the paper's definition; Flow-GRPO's variant is
  :math:`\exp(\text{logit\_scale})\cos / 30` on ``openai/clip-vit-large-patch14`` without the prefix).

Preprocessing is each model's own processor: the images are rounded to ``uint8`` (what a saved PNG
holds) and given to the ``CLIPImageProcessor`` of the directory (bicubic resize of the short side,
centre crop, normalisation with the directory's mean / std: 224 px and the OpenAI constants for
these models); prompts are tokenized with its ``CLIPTokenizer``, truncated to its ``model_max_length``.

``aesthetic`` (the LAION improved aesthetic predictor, Schuhmann 2022, as Flow-GRPO uses it): a CLIP
directory (``openai/clip-vit-large-patch14``; only the image tower and the image processor are used)
plus the MLP head file, a torch ``state_dict`` saved with ``torch.save`` (``aesthetic_mlp.pth`` or the
original name ``sac+logos+ava1-l14-linearMSE.pth``) or a safetensors file ``aesthetic_mlp.safetensors``,
with the keys of the predictor's ``nn.Sequential``: ``layers.{0,2,4,6,7}.{weight,bias}`` (Linear
768-1024-128-64-16-1 with dropout between, no activations; any widths whose chain fits are accepted):

.. math:: r = \mathrm{MLP}(e_I / \|e_I\|)

``ocr:module:function``: Flow-GRPO's OCR reward.  ``function(images) -> list of B str`` is the user's
recogniser (e.g. PaddleOCR, as Flow-GRPO) on ``(B, 3, H, W)`` images in ``[0, 1]``; the target text is
the metadata's ``"text"`` or else the first double-quoted span of the prompt; with spaces removed and
lower case, :math:`r = 1 - \min(d, |t|) / |t|`, :math:`d = 0` when the target :math:`t` occurs in the
recognised text and the Levenshtein distance otherwise.

``geneval:module:function``: the user's GenEval evaluator (an object detector is needed, which
``transformers`` alone does not provide; Flow-GRPO calls a reward server), called as
``function(images, prompts, metadata) -> (B,)`` with every metadata dict holding GenEval's ``"tag"``
and ``"include"`` (a ``*_metadata.jsonl`` prompt file, :mod:`scale.data`); the adapter checks this
contract before each call.

ImageReward (Xu et al. 2023) is not an adapter: its released checkpoint ``ImageReward.pt`` is a
state dict of the BLIP repository's own modules (a BERT text encoder with cross-attention, BLIP's
ViT-L and an MLP head), which ``transformers`` cannot load without a key conversion that cannot be
tested here without the real checkpoint; use the ``image-reward`` package through
``"module:function"``.

Reference: ``flowgrpo`` (PickScore, CLIPScore, aesthetic, OCR and GenEval rewards), ``diffusionopd``
(PickScore, CLIPScore, HPSv2.1, aesthetics, OCR and GenEval tasks).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["ClipReward", "AestheticReward", "OcrReward", "GenevalReward", "levenshtein", "load_model_adapter",
           "load_callable_adapter", "AESTHETIC_HEAD_FILES"]

#: the names under which the aesthetic MLP head is looked up in its directory
AESTHETIC_HEAD_FILES = ("aesthetic_mlp.pth", "sac+logos+ava1-l14-linearMSE.pth", "aesthetic_mlp.safetensors")


def _to_uint8_hwc(images: Tensor) -> List[Any]:
    """``(B, 3, H, W)`` in [0, 1] -> B ``(H, W, 3)`` uint8 numpy arrays (rounded as PIL conversions do)."""
    arr = (images.detach().to(torch.float32).cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return list(arr.permute(0, 2, 3, 1).numpy())


def _check_clip_dir(directory: str, spec: str, need_text: bool) -> Path:
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reward {spec!r}: model directory {directory!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"reward {spec!r}: {directory!r} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"reward {spec!r}: {directory!r} has no config.json (save the CLIP model there with "
                         "CLIPModel.save_pretrained)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"reward {spec!r}: {str(config)!r} is not valid JSON ({err})") from None
    if model_type != "clip":
        raise ValueError(f"reward {spec!r}: {directory!r} holds a {model_type!r} model, expected a CLIP model "
                         "(model_type 'clip')")
    if not any((path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ValueError(f"reward {spec!r}: {directory!r} has no preprocessor_config.json / processor_config.json "
                         "(save the CLIP processor there with CLIPProcessor.save_pretrained)")
    if need_text and not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise ValueError(f"reward {spec!r}: {directory!r} has no tokenizer files (save the CLIP processor there)")
    return path


def _load(loader: Callable, path: Path, spec: str, what: str):
    try:
        return loader(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"reward {spec!r}: could not load the {what} from {str(path)!r}: {err}") from err


class ClipReward:
    r"""A CLIP-based reward on a local model directory: PickScore, HPSv2(.1) or CLIPScore (see the
    module docs for each formula and its source).

    .. math::
        r_{pick} = e^{s}\cos(e_I, e_T),\quad r_{hps} = \cos(e_I, e_T),\quad
        r_{clip} = 2.5\max(\cos(e_I, e_T), 0)

    with :math:`s` the model's ``logit_scale``.

    Args:
        directory: the model + processor directory.
        kind: ``"pickscore"``, ``"hpsv2"`` or ``"clipscore"``.
        device: where the model runs.
        dtype: the model's dtype (float32 by default).
        spec: the reward spec (for messages).

    Raises:
        FileNotFoundError: no such directory.
        ValueError: not a CLIP model + processor directory, or unknown ``kind``.

    Reference: ``flowgrpo`` (PickScore and CLIPScore rewards), ``diffusionopd`` (HPSv2.1).
    """

    KINDS = ("pickscore", "hpsv2", "clipscore")
    CLIPSCORE_W = 2.5  # Hessel et al. 2021
    CLIPSCORE_PREFIX = "A photo depicts "

    def __init__(self, directory: str, kind: str = "pickscore", device: Any = "cpu", dtype: torch.dtype = torch.float32,
                 spec: str = ""):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        from transformers import CLIPModel, CLIPProcessor

        spec = spec or f"{kind}:{directory}"
        path = _check_clip_dir(directory, spec, need_text=True)
        self.kind, self.device, self.dtype = kind, torch.device(device), dtype
        self.processor = _load(CLIPProcessor.from_pretrained, path, spec, "CLIP processor")
        model = _load(CLIPModel.from_pretrained, path, spec, "CLIP model")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def embeddings(self, images: Tensor, prompts: Sequence[str]) -> tuple:
        """Unit image and text embeddings ``(B, E)`` each, after the model's own preprocessing."""
        if self.kind == "clipscore":
            prompts = [self.CLIPSCORE_PREFIX + p for p in prompts]
        pix = self.processor.image_processor(_to_uint8_hwc(images), return_tensors="pt",
                                             input_data_format="channels_last")["pixel_values"]
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True,
                                       max_length=self.processor.tokenizer.model_max_length, return_tensors="pt")
        m = self.model
        e_i = m.visual_projection(m.vision_model(pixel_values=pix.to(self.device, self.dtype)).pooler_output)
        e_t = m.text_projection(m.text_model(input_ids=tok["input_ids"].to(self.device),
                                             attention_mask=tok["attention_mask"].to(self.device)).pooler_output)
        return (torch.nn.functional.normalize(e_i.float(), dim=-1), torch.nn.functional.normalize(e_t.float(), dim=-1))

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        e_i, e_t = self.embeddings(images, prompts)
        cos = (e_i * e_t).sum(-1)
        if self.kind == "pickscore":
            return self.model.logit_scale.exp().float() * cos
        if self.kind == "hpsv2":
            return cos
        return self.CLIPSCORE_W * cos.clamp(min=0)


def _load_head(path: Path, spec: str) -> List[tuple]:
    """The aesthetic head's Linear layers ``[(W, b), ...]`` from its state dict file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt or non-torch file: say which
            raise ValueError(f"reward {spec!r}: could not read the aesthetic head {str(path)!r}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"reward {spec!r}: {str(path)!r} must hold a state_dict, got {type(state).__name__}")
    pattern = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
    bad = [k for k in state if not pattern.match(k)]
    if bad or not state:
        raise ValueError(f"reward {spec!r}: {str(path)!r} must hold the predictor's layers.N.weight / layers.N.bias "
                         f"keys, got {sorted(state)[:6]}")
    idx = sorted({int(pattern.match(k).group(1)) for k in state})
    layers = []
    for i in idx:
        w, b = state.get(f"layers.{i}.weight"), state.get(f"layers.{i}.bias")
        if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"reward {spec!r}: {str(path)!r} layer {i} needs a 2-d weight and a matching bias")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise ValueError(f"reward {spec!r}: {str(path)!r} layer {i} takes {w.shape[1]} inputs, the layer before "
                             f"gives {layers[-1][0].shape[0]}")
        layers.append((w.float(), b.float()))
    if layers[-1][0].shape[0] != 1:
        raise ValueError(f"reward {spec!r}: {str(path)!r} must end in one output, got {layers[-1][0].shape[0]}")
    return layers


class AestheticReward:
    r"""The LAION improved aesthetic predictor: an MLP head on the unit CLIP image embedding (see the
    module docs for the directory layout and the head file format).

    .. math:: r(x) = W_L(\cdots W_1 \hat e_I + b_1 \cdots) + b_L,\qquad \hat e_I = e_I / \|e_I\|

    (dropout between the layers is inactive at evaluation; the predictor has no activations).

    Args:
        directory: CLIP model + image processor + head file.
        device: where the model runs.
        dtype: the CLIP model's dtype (the head runs in float32).
        spec: the reward spec (for messages).

    Raises:
        FileNotFoundError: no such directory.
        ValueError: not a CLIP directory, no or a malformed head file, a head whose input width is not
            the CLIP projection width.

    Reference: ``flowgrpo`` (aesthetic reward), ``diffusionopd`` (aesthetics task).
    """

    def __init__(self, directory: str, device: Any = "cpu", dtype: torch.dtype = torch.float32, spec: str = ""):
        from transformers import CLIPImageProcessor, CLIPModel

        spec = spec or f"aesthetic:{directory}"
        path = _check_clip_dir(directory, spec, need_text=False)
        heads = [path / f for f in AESTHETIC_HEAD_FILES if (path / f).is_file()]
        if len(heads) != 1:
            raise ValueError(f"reward {spec!r}: {directory!r} must hold exactly one aesthetic head file of "
                             f"{list(AESTHETIC_HEAD_FILES)}, found {[h.name for h in heads]}")
        self.device, self.dtype = torch.device(device), dtype
        self.image_processor = _load(CLIPImageProcessor.from_pretrained, path, spec, "CLIP image processor")
        model = _load(CLIPModel.from_pretrained, path, spec, "CLIP model")
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.head = [(w.to(self.device), b.to(self.device)) for w, b in _load_head(heads[0], spec)]
        proj = int(model.config.projection_dim)
        if self.head[0][0].shape[1] != proj:
            raise ValueError(f"reward {spec!r}: the head takes {self.head[0][0].shape[1]} inputs, the CLIP image "
                             f"embedding has {proj}")

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        pix = self.image_processor(_to_uint8_hwc(images), return_tensors="pt",
                                   input_data_format="channels_last")["pixel_values"]
        m = self.model
        e = m.visual_projection(m.vision_model(pixel_values=pix.to(self.device, self.dtype)).pooler_output).float()
        h = torch.nn.functional.normalize(e, dim=-1)
        for w, b in self.head:
            h = h @ w.T + b
        return h[:, 0]


def levenshtein(a: str, b: str) -> int:
    r"""Edit distance (insertions, deletions, substitutions of one character each, cost 1) (``flowgrpo``
    OCR reward).

    .. math:: d(a_{1..i}, b_{1..j}) = \min\{d_{i-1,j} + 1,\ d_{i,j-1} + 1,\ d_{i-1,j-1} + [a_i \ne b_j]\}

    Args:
        a, b: the strings.

    Returns:
        the distance.
    """
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class OcrReward:
    r"""Flow-GRPO's OCR reward around the user's recogniser (see the module docs).

    .. math:: r = 1 - \min(d, |t|) / |t|,\qquad d = 0 \text{ if } t \subseteq \hat t \text{ else } \mathrm{lev}(\hat t, t)

    with :math:`t` the target and :math:`\hat t` the recognised text, spaces removed, lower case.

    Args:
        recognize: ``recognize(images (B, 3, H, W) in [0, 1]) -> list of B str``.
        spec: the reward spec (for messages).

    Reference: ``flowgrpo`` (OCR reward).
    """

    def __init__(self, recognize: Callable, spec: str = "ocr"):
        if not callable(recognize):
            raise TypeError(f"reward {spec!r}: the recogniser is not callable (got {type(recognize).__name__})")
        self.recognize, self.spec = recognize, spec

    @staticmethod
    def target(prompt: str, metadata: Dict[str, Any]) -> str:
        """The text to render: ``metadata["text"]``, else the first double-quoted span of ``prompt``."""
        if isinstance(metadata.get("text"), str) and metadata["text"].strip():
            return metadata["text"]
        parts = prompt.split('"')
        if len(parts) < 3 or not parts[1].strip():
            raise ValueError(f"OCR reward: prompt {prompt!r} has no double-quoted text and its metadata no \"text\"")
        return parts[1]

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Dict[str, Any]]) -> Tensor:
        texts = list(self.recognize(images))
        if len(texts) != len(prompts) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"reward {self.spec!r}: the recogniser must return {len(prompts)} strings, got {texts!r}")
        out = []
        for prompt, meta, seen in zip(prompts, metadata, texts):
            t = self.target(prompt, meta).replace(" ", "").lower()
            s = seen.replace(" ", "").lower()
            d = 0 if t in s else levenshtein(s, t)
            out.append(1.0 - min(d, len(t)) / len(t))
        return torch.tensor(out, dtype=torch.float32, device=images.device)


class GenevalReward:
    r"""The user's GenEval evaluator, with GenEval's metadata contract checked (see the module docs).

    .. math:: r = f(x, c, m),\qquad m \ni \texttt{tag}, \texttt{include}

    Args:
        evaluate: ``evaluate(images, prompts, metadata) -> (B,)``.
        spec: the reward spec (for messages).

    Reference: ``flowgrpo`` (GenEval reward), ``diffusionopd`` (GenEval task).
    """

    def __init__(self, evaluate: Callable, spec: str = "geneval"):
        if not callable(evaluate):
            raise TypeError(f"reward {spec!r}: the evaluator is not callable (got {type(evaluate).__name__})")
        self.evaluate, self.spec = evaluate, spec

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Dict[str, Any]]) -> Tensor:
        for prompt, meta in zip(prompts, metadata):
            if "tag" not in meta or not isinstance(meta.get("include"), list):
                raise ValueError(f"reward {self.spec!r} needs GenEval metadata with \"tag\" and an \"include\" list "
                                 f"for prompt {prompt!r} (a *_metadata.jsonl prompt file), got {dict(meta)!r}")
        return self.evaluate(images, list(prompts), list(metadata))


def load_model_adapter(name: str, directory: str, spec: str, device: Any = "cpu", **kwargs) -> Callable:
    r"""The reward of adapter ``name`` on a local model directory (``flowgrpo`` reward models).

    .. math:: r = r_{name}(x, c)

    Args:
        name: ``"pickscore"``, ``"hpsv2"``, ``"clipscore"`` or ``"aesthetic"``.
        directory: the model directory.
        spec: the spec (for messages).
        device: where the model runs.
        **kwargs: ``dtype=``.

    Returns:
        :class:`ClipReward` or :class:`AestheticReward`.
    """
    if name == "aesthetic":
        return AestheticReward(directory, device=device, spec=spec, **kwargs)
    return ClipReward(directory, kind=name, device=device, spec=spec, **kwargs)


def load_callable_adapter(name: str, fn: Callable, spec: str) -> Callable:
    r"""The OCR or GenEval reward around the user's callable (``flowgrpo`` OCR / GenEval rewards).

    .. math:: r = r_{name}(x, c, m)

    Args:
        name: ``"ocr"`` or ``"geneval"``.
        fn: the recogniser or evaluator.
        spec: the spec (for messages).

    Returns:
        :class:`OcrReward` or :class:`GenevalReward`.
    """
    return OcrReward(fn, spec) if name == "ocr" else GenevalReward(fn, spec)
