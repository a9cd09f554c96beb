"""Fixtures of the scale tests: one tiny SD3.5-style pipeline built per session, loaded offline.

``HF_HUB_OFFLINE=1`` is set when this file is imported (before diffusers / huggingface_hub read it),
so nothing in these tests can reach the network.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:  # imported earlier in this session: flip it too
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Directory of the tiny pipeline written by :func:`scale.tiny.build_tiny_pipeline` (seed 0)."""
    from scale.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd35") / "pipe", seed=0)


@pytest.fixture()
def tiny_pipe(tiny_model_dir):
    """A fresh float32 CPU pipeline per test (tests add adapters to its transformer)."""
    from scale.pipeline import load_pipeline

    return load_pipeline(tiny_model_dir)


@pytest.fixture()
def embeds(tiny_pipe):
    """Cached CFG embeddings of two prompts (T5 sequence length 8)."""
    from scale.text import PromptCache

    return PromptCache(tiny_pipe, max_sequence_length=8, guidance=True).encode(["a red cat", "a blue dog"])


@pytest.fixture()
def latents0(tiny_pipe):
    """Seeded initial noise ``(2, C, S, S)`` for the tiny transformer."""
    cfg = tiny_pipe.transformer.config
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
