"""Prompt datasets (issue 12, point 3): plain text, Flow-GRPO's GenEval / OCR splits, generic jsonl with
metadata; rewards receive the metadata, two-argument rewards keep working."""

from __future__ import annotations

import json

import pytest
import torch

from scale.data import PromptBatch, PromptSet, load_prompts
from scale.rewards import CheckedReward, accepts_metadata, get_reward
from scale.tiny import TINY_GENEVAL


def test_plain_text_one_prompt_per_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("  a cat  \n\n\ta dog\n   \n")
    data = load_prompts(path, "task 'x'")
    assert data.prompts == ["a cat", "a dog"] and data.metadata == [{}, {}] and data.path == str(path)


def test_flowgrpo_ocr_split_is_plain_text(tmp_path):
    """Flow-GRPO's ocr/train.txt: one prompt per line, the text to render in double quotes."""
    lines = ['A storefront sign that reads "Bakery"', 'A t-shirt with the words "Hello World" printed on it']
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    data = load_prompts(path)
    assert data.prompts == lines and data.metadata == [{}, {}]


def test_flowgrpo_geneval_metadata_jsonl(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in TINY_GENEVAL) + "\n")
    data = load_prompts(path)
    assert data.prompts == [m["prompt"] for m in TINY_GENEVAL]
    assert data.metadata == TINY_GENEVAL  # the whole line, tag and include kept
    assert data.metadata[2]["tag"] == "counting" and data.metadata[2]["include"] == [{"class": "apple", "count": 3}]


def test_generic_jsonl_with_metadata_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": " a red car ", "target": 0.7}\n\n{"prompt": "a tree", "tags": ["x"]}\n')
    data = load_prompts(path)
    assert data.prompts == ["a red car", "a tree"]
    assert data.metadata == [{"prompt": " a red car ", "target": 0.7}, {"prompt": "a tree", "tags": ["x"]}]
    batch = data.batch([1, 0, 1])
    assert list(batch) == ["a tree", "a red car", "a tree"] and batch.metadata[1]["target"] == 0.7
    for text, match in (('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2 must be a JSON object"),
                        ('{"prompt": ""}\n', "non-empty string"),
                        ('["a list"]\n', "line 1 must be a JSON object"),
                        ('{"prompt": "a"}\n{not json\n', "line 2 is not JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_prompts(path, "task 't'")
    with pytest.raises(FileNotFoundError, match="task 't'"):
        load_prompts(tmp_path / "missing.jsonl", "task 't'")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(tmp_path / "blank.jsonl")
    with pytest.raises(ValueError, match="one metadata dict per prompt"):
        PromptSet(["a", "b"], [{}])
    with pytest.raises(ValueError, match="one metadata dict per prompt"):
        PromptBatch(["a"], [{}, {}])


def _images(b=2):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_signature_detection():
    def two(images, prompts):
        return images.flatten(1).mean(1)

    def three(images, prompts, metadata):
        return images.flatten(1).mean(1)

    def named(images, prompts, metadata=None):
        return images.flatten(1).mean(1)

    def varargs(*args):
        return args[0].flatten(1).mean(1)

    def with_default(images, prompts, quality=95):  # the third parameter is an option, not the metadata
        return images.flatten(1).mean(1)

    class Cls:
        def __call__(self, images, prompts, metadata):
            return images.flatten(1).mean(1)

    assert [accepts_metadata(f) for f in (two, three, named, varargs, with_default, Cls())] == \
        [False, True, True, True, False, True]


def test_rewards_receive_the_metadata_and_two_argument_rewards_still_work():
    seen = []

    def three(images, prompts, metadata):
        seen.append(metadata)
        return torch.tensor([float(m.get("target", -1.0)) for m in metadata])

    def two(images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    images, prompts, meta = _images(), ["ab", "abcd"], [{"target": 0.25}, {}]
    assert CheckedReward(three, "three")(images, prompts, meta).tolist() == [0.25, -1.0]
    assert seen == [meta]
    assert CheckedReward(two, "two")(images, prompts, meta).tolist() == [2.0, 4.0]
    assert CheckedReward(three, "three")(images, prompts).tolist() == [-1.0, -1.0]  # no metadata: {} each
    assert get_reward("brightness")(images, prompts, meta).shape == (2,)
    with pytest.raises(ValueError, match="metadata must be a list of 2 dicts"):
        CheckedReward(three, "three")(images, prompts, [{}])
    with pytest.raises(ValueError, match="metadata must be a list of 2 dicts"):
        CheckedReward(three, "three")(images, prompts, [{}, "x"])


def test_a_stage1_run_passes_the_jsonl_metadata_to_the_reward(workspace, tmp_path, monkeypatch):
    """End to end: a GenEval-style prompt file, a three-argument reward; every call sees the metadata
    of exactly the prompts it scores."""
    import sys
    import textwrap

    from scale.train import Trainer
    from tests.scale.train_helpers import tiny_config

    (tmp_path / "meta_reward_mod.py").write_text(textwrap.dedent("""
        import torch
        CALLS = []

        def reward(images, prompts, metadata):
            CALLS.append((list(prompts), [dict(m) for m in metadata]))
            return torch.tensor([float(len(m["include"])) for m in metadata])
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "geneval_metadata.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in TINY_GENEVAL))
    cfg = tiny_config(workspace, tmp_path / "run", prompt_files=[str(path), workspace["prompt_files"][1]],
                      teacher_loras=["", workspace["teachers"][1]], rewards=["meta_reward_mod:reward", ""],
                      stage1_steps=1, group_size=2, distill_steps=0)
    try:
        assert Trainer(cfg).run().status == "finished"
        calls = sys.modules["meta_reward_mod"].CALLS
    finally:
        sys.modules.pop("meta_reward_mod", None)
    by_prompt = {m["prompt"]: m for m in TINY_GENEVAL}
    assert len(calls) == cfg.batch_size * cfg.group_size // cfg.micro_batch_size
    for prompts, metadata in calls:
        assert metadata == [by_prompt[p] for p in prompts]


from tests.scale.train_helpers import workspace  # noqa: E402,F401  (fixture)
