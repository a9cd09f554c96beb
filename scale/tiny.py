"""A tiny random-weight SD3.5-style pipeline, built from configs, for tests and dry runs.

No weights can be downloaded here, so the tests run the real ``StableDiffusion3Pipeline`` code path on
a pipeline with the SD3.5 architecture (``SD3Transformer2DModel`` with ``qk_norm="rms_norm"`` and a
dual-attention (MMDiT-X) layer, ``AutoencoderKL``, two CLIP text encoders with projection, a T5
encoder, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``) at toy sizes.  Tokenizers are built from
in-memory vocabularies (byte-level BPE for CLIP, Unigram for T5), so nothing is fetched.  The result is
saved with ``save_pretrained`` and loads back with ``from_pretrained`` under ``HF_HUB_OFFLINE=1``.

Reference: ``diffusionopd`` / ``flowgrpo`` (SD3.5-Medium is the model both fine-tune).
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

__all__ = ["build_tiny_pipeline", "make_tiny_pipeline", "TINY_SIZES", "make_tiny_clip", "build_tiny_rewards",
           "TINY_CLIP_SIZES", "TINY_GENEVAL"]

#: The sizes of the tiny pipeline (one place, so tests and docs can quote them).
TINY_SIZES = {
    "latent_size": 8,  # latent height = width (the transformer's sample_size)
    "latent_channels": 4,  # VAE latent channels = transformer in/out channels
    "patch_size": 2,  # 8x8 latent -> 4x4 = 16 image tokens
    "num_layers": 2,  # transformer blocks; block 0 is a dual-attention (SD3.5 MMDiT-X) block
    "num_heads": 2,
    "head_dim": 16,  # transformer width = 2 * 16 = 32
    "clip_hidden": 32,  # each CLIP encoder's width (SD3.5: 768 and 1280)
    "clip_projection": 32,  # each CLIP's pooled projection (pooled_projection_dim = 2 * 32)
    "clip_max_length": 16,  # CLIP tokenizer model_max_length (SD3.5: 77)
    "t5_d_model": 64,  # joint_attention_dim; must be >= the summed CLIP widths (64)
    "vae_channels": 8,  # one-level VAE: vae_scale_factor 1, so images are 8x8 px
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def _clip_tokenizer(max_length: int):
    """A byte-level BPE CLIP tokenizer from an in-memory vocabulary (every byte, with and without the
    end-of-word suffix ``</w>``, plus a few merges so common letter pairs become one token)."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for pair in ("t h", "a n", "i n", "e r", "o n"):
        left, right = pair.split()
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _t5_tokenizer():
    """A Unigram T5 tokenizer from an in-memory vocabulary (letters, digits, punctuation, with and
    without the word-start marker), no sentinel tokens."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    symbols = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("\u2581" + c, -3.0) for c in symbols]
    pieces += [(c, -4.0) for c in symbols]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    r"""Build a tiny random-weight SD3.5-style ``StableDiffusion3Pipeline`` and ``save_pretrained`` it.

    Its transformer predicts the flow-matching velocity :math:`v(x_\sigma, \sigma, c)` of
    :math:`x_\sigma = (1-\sigma) x_{data} + \sigma \varepsilon` like SD3.5, with random weights.

    Architecture as SD3.5-Medium (qk RMS-norm, dual attention in block 0, two CLIP-L/G-like encoders
    whose hidden states are concatenated and zero-padded to the T5 width, pooled projections
    concatenated), sizes in :data:`TINY_SIZES`.  Weights are drawn from the model classes' own
    initialisers under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards), so
    the same ``seed`` gives the same files.  Every component is put in ``eval()`` mode (the text
    encoders have dropout).

    Args:
        out_dir: directory to write (created; must be empty or absent).
        seed: integer seed of the random weights.

    Returns:
        The directory, loadable with ``StableDiffusion3Pipeline.from_pretrained`` offline.

    The files are written to a temporary sibling directory and renamed into place, so a failure
    leaves nothing behind.

    Raises:
        ValueError: ``out_dir`` exists and is not empty.
        TypeError: ``seed`` is not an int.

    Reference: ``flowgrpo``, ``diffusionopd`` (SD3.5-Medium is the model they fine-tune).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir must be an empty or absent directory, got {str(out)!r} (not empty)")
    pipe = make_tiny_pipeline(seed)
    # write into a temporary sibling and rename it into place: a failure leaves no partial pipeline
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_tiny_pipeline(seed: int = 0):
    r"""The in-memory pipeline that :func:`build_tiny_pipeline` saves (same ``seed``, same weights).

    Sizes: latents :math:`C \times S \times S = 4 \times 8 \times 8`, patch 2 (16 image tokens),
    width 32, T5 width :math:`64 \ge 32 + 32` (the two CLIP widths).

    Args:
        seed: integer seed of the random weights.

    Returns:
        ``StableDiffusion3Pipeline`` on the CPU in float32, every component in ``eval()`` mode.

    Reference: ``flowgrpo``, ``diffusionopd`` (SD3.5-Medium architecture).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    s = TINY_SIZES
    if s["t5_d_model"] < 2 * s["clip_hidden"]:
        raise ValueError("TINY_SIZES: t5_d_model must be >= the summed CLIP hidden sizes")
    clip_tok = _clip_tokenizer(s["clip_max_length"])
    t5_tok = _t5_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=s["latent_size"],
            patch_size=s["patch_size"],
            in_channels=s["latent_channels"],
            out_channels=s["latent_channels"],
            num_layers=s["num_layers"],
            attention_head_dim=s["head_dim"],
            num_attention_heads=s["num_heads"],
            joint_attention_dim=s["t5_d_model"],
            caption_projection_dim=s["num_heads"] * s["head_dim"],
            pooled_projection_dim=2 * s["clip_projection"],
            pos_embed_max_size=s["latent_size"] // s["patch_size"] * 2,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(s["vae_channels"],),
            layers_per_block=1,
            latent_channels=s["latent_channels"],
            norm_num_groups=4,
            sample_size=s["latent_size"],
            scaling_factor=1.5305,  # SD3.5's VAE constants
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoders = []
        for _ in range(2):
            cfg = CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=s["clip_hidden"],
                intermediate_size=2 * s["clip_hidden"],
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=s["clip_max_length"],
                projection_dim=s["clip_projection"],
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
                hidden_act="gelu",
            )
            text_encoders.append(CLIPTextModelWithProjection(cfg))
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=s["t5_d_model"],
                d_kv=16,
                d_ff=2 * s["t5_d_model"],
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=t5_tok.pad_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=clip_tok,
        text_encoder_2=text_encoders[1],
        tokenizer_2=_clip_tokenizer(s["clip_max_length"]),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    for module in (transformer, vae, *text_encoders, t5):
        module.eval()
    return pipe


#: The sizes of the tiny CLIP reward models (PickScore-like, aesthetic-like).
TINY_CLIP_SIZES = {
    "hidden": 32,  # text and vision widths (ViT-H/14: 1024 / 1280)
    "layers": 2,
    "heads": 2,
    "projection_dim": 16,  # joint embedding width (ViT-H/14: 1024, ViT-L/14: 768)
    "image_size": 16,  # processor resize / crop (224 for the real models)
    "patch_size": 8,
    "max_length": 16,  # tokenizer model_max_length (77)
    "aesthetic_widths": (16, 32, 16, 8, 4, 1),  # the head's Linear chain (768-1024-128-64-16-1)
}

#: GenEval-style metadata lines of the tiny prompt file (Flow-GRPO's geneval/*_metadata.jsonl form).
TINY_GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "bench", "count": 1}],
     "prompt": "a photo of a dog and a bench"},
    {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
     "prompt": "a photo of three apples"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [{"class": "cup", "count": 1}, {"class": "book", "count": 1,
                                                                   "position": ["left of", 0]}],
     "prompt": "a photo of a book left of a cup"},
    {"tag": "color_attr", "include": [{"class": "bird", "count": 1, "color": "blue"},
                                      {"class": "vase", "count": 1, "color": "yellow"}],
     "prompt": "a photo of a blue bird and a yellow vase"},
]


def make_tiny_clip(seed: int = 0):
    r"""A tiny random-weight ``CLIPModel`` and its ``CLIPProcessor`` (byte-level BPE tokenizer from an
    in-memory vocabulary, OpenAI normalisation constants), built from configs, ``eval()`` mode.

    Its score is :math:`e^{s}\cos(e_I, e_T)` (PickScore's form) with random weights; sizes in
    :data:`TINY_CLIP_SIZES`.

    Args:
        seed: integer seed of the weights (the global RNG state is restored).

    Returns:
        ``(model, processor)``.

    Reference: ``flowgrpo`` (CLIP-based rewards).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    s = TINY_CLIP_SIZES
    tok = _clip_tokenizer(s["max_length"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": s["image_size"]},
                                         crop_size={"height": s["image_size"], "width": s["image_size"]})
    common = dict(hidden_size=s["hidden"], intermediate_size=2 * s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], hidden_act="gelu")
    text = dict(common, vocab_size=len(tok), max_position_embeddings=s["max_length"],
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(common, image_size=s["image_size"], patch_size=s["patch_size"])
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tok)


def _write_atomic_dir(out: Path, write) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir must be an empty or absent directory, got {str(out)!r} (not empty)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_rewards(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    r"""Write tiny reward-model directories and prompt files for a dry run of the reward adapters:

    * ``OUT/pickscore/``: a tiny CLIP model + processor (:func:`make_tiny_clip`), the layout of a
      ``pickscore:``, ``hpsv2:`` or ``clipscore:`` directory;
    * ``OUT/aesthetic/``: another tiny CLIP + ``aesthetic_mlp.pth``, a random head with the LAION
      predictor's keys ``layers.{0,2,4,6,7}`` (widths :data:`TINY_CLIP_SIZES`), the layout of an
      ``aesthetic:`` directory;
    * ``OUT/geneval_metadata.jsonl``: GenEval-style prompts with metadata (:data:`TINY_GENEVAL`);
    * ``OUT/ocr_prompts.txt``: OCR-style prompts (the text to render in double quotes).

    Random weights: the scores are deterministic but meaningless (for tests and dry runs only).

    .. math:: r_{pick} = e^{s}\cos(e_I, e_T),\qquad r_{aes} = \mathrm{MLP}(e_I / \|e_I\|)

    Args:
        out_dir: directory to write (created; must be empty or absent).
        seed: integer seed of the weights.

    Returns:
        ``{"pickscore": dir, "aesthetic": dir, "geneval_prompts": file, "ocr_prompts": file}`` (strings).

    Raises:
        ValueError: ``out_dir`` exists and is not empty.

    Reference: ``flowgrpo`` (PickScore, aesthetic, GenEval and OCR tasks and splits).
    """
    import json

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    out = Path(out_dir)

    def write(tmp: Path) -> None:
        for k, name in enumerate(("pickscore", "aesthetic")):
            model, processor = make_tiny_clip(seed + k)
            model.save_pretrained(tmp / name)
            processor.save_pretrained(tmp / name)
        widths = TINY_CLIP_SIZES["aesthetic_widths"]
        gen = torch.Generator().manual_seed(seed + 2)
        head = {}
        for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
            head[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
            head[f"layers.{i}.bias"] = 0.1 * torch.randn(n_out, generator=gen)
        torch.save(head, tmp / "aesthetic" / "aesthetic_mlp.pth")
        (tmp / "geneval_metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in TINY_GENEVAL))
        (tmp / "ocr_prompts.txt").write_text('a sign that says "open"\na poster with the text "hello world"\n'
                                             'a mug printed with "opd"\na shop window reading "sale"\n')

    _write_atomic_dir(out, write)
    return {"pickscore": str(out / "pickscore"), "aesthetic": str(out / "aesthetic"),
            "geneval_prompts": str(out / "geneval_metadata.jsonl"), "ocr_prompts": str(out / "ocr_prompts.txt")}
