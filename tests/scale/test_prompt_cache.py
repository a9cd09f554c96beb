"""Prompt embeddings on the host (issue 12, point 2): the cache's tensors are on the CPU, batches move
to the device per micro-batch, and a memory-mapped cache on disk (written once, each process its
share) gives the same embeddings and the same run as the in-memory cache."""

from __future__ import annotations

import json

import pytest
import torch

from scale.text import CACHE_INDEX, PromptCache

PROMPTS = ["a red cat", "a blue dog", "two birds", "an old car", "the sea", "xyz"]  # distinct in 8 T5 tokens


def _count(pipe):
    calls = []
    original = pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    pipe.encode_prompt = counting
    return calls


def test_in_memory_cache_is_on_the_host(tiny_pipe):
    cache = PromptCache(tiny_pipe, max_sequence_length=8, guidance=True, pin_memory=False)
    out = cache.encode(PROMPTS[:3])
    assert all(t.device.type == "cpu" for blk in cache.blocks for t in blk)
    assert all(t.device.type == "cpu" for t in out._fields())
    assert cache.pin_memory == torch.cuda.is_available()  # pinned by default where there is a GPU


def test_disk_cache_written_by_shares_equals_the_in_memory_cache(tiny_pipe, tmp_path):
    pe, ne, pp, npp = tiny_pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=True, max_sequence_length=8)
    want = {"prompt_embeds": pe, "pooled_prompt_embeds": pp, "negative_prompt_embeds": ne,
            "negative_pooled_prompt_embeds": npp}
    calls = _count(tiny_pipe)
    writer = PromptCache(tiny_pipe, max_sequence_length=8, guidance=True, batch_size=2)
    path = tmp_path / "cache"
    # two processes, run one after the other (their barriers are no-ops here): rank 1 first
    writer.prepare_disk(path, PROMPTS)
    calls.clear()
    writer.write_disk_shard(path, PROMPTS, rank=1, world=2)
    assert calls == [[PROMPTS[1], PROMPTS[3]], [PROMPTS[5]]]  # its share only, in batches of 2
    writer.write_disk_shard(path, PROMPTS, rank=0, world=2)
    assert not (path / CACHE_INDEX).exists()  # not committed until the main process says so
    writer.commit_disk(path, PROMPTS)
    index = json.loads((path / CACHE_INDEX).read_text())
    assert index["prompts"] == PROMPTS and index["fields"]["embeds"]["shape"][0] == len(PROMPTS)

    reader = PromptCache(tiny_pipe, max_sequence_length=8, guidance=True)
    calls.clear()
    assert reader.attach(path, PROMPTS) is False  # read, not written
    assert calls == [["a photo of an opd_ref cache probe"]]  # the probe only: no prompt is re-encoded
    order = [3, 0, 5, 5, 2]
    got = reader.encode([PROMPTS[i] for i in order])
    assert all(t.device.type == "cpu" for blk in reader.blocks for t in blk)
    assert all(t.device.type == "cpu" for t in got._fields())
    for field in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        torch.testing.assert_close(getattr(got, field), want[field][order], rtol=0, atol=1e-6)
    # a prompt the cache lacks is encoded into memory
    extra = reader.encode(["something new"])
    torch.testing.assert_close(extra.prompt_embeds, PromptCache(tiny_pipe, max_sequence_length=8,
                                                               guidance=False).encode(["something new"]).prompt_embeds,
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_sequence_length 8, this run uses 6"):
        PromptCache(tiny_pipe, max_sequence_length=6).attach(path, PROMPTS)
    with torch.no_grad():  # other text encoders: the probe prompt differs
        tiny_pipe.text_encoder_3.shared.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other text encoders"):
        PromptCache(tiny_pipe, max_sequence_length=8).attach(path, PROMPTS)


def test_a_run_with_the_disk_cache_equals_the_run_in_memory(workspace, tmp_path):
    """Same config, embeddings in memory vs memory-mapped from a cache directory that the run writes:
    the same metrics and the same student LoRA; a later run reads the cache without writing it."""
    from scale.train import Trainer
    from tests.scale.train_helpers import lora_file_tensors, read_metrics, tiny_config

    runs = {}
    for name, cache in (("memory", ""), ("disk", str(tmp_path / "pc"))):
        cfg = tiny_config(workspace, tmp_path / name, distill_steps=1, prompt_cache=cache,
                          heldout_prompt_files=[workspace["heldout"]])
        trainer = Trainer(cfg)
        assert all(t.device.type == "cpu" for blk in trainer.setup.cache.blocks for t in blk)
        assert trainer.run().status == "finished"
        runs[name] = (read_metrics(tmp_path / name), lora_file_tensors(tmp_path / name / "student"))
    written = (tmp_path / "pc" / CACHE_INDEX).stat().st_mtime_ns
    metrics, lora = runs["disk"]
    assert len(metrics) == len(runs["memory"][0])
    for a, b in zip(metrics, runs["memory"][0]):
        assert a.keys() == b.keys()
        for k in a:
            if k != "time_s" and isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    for k, t in lora.items():
        torch.testing.assert_close(t, runs["memory"][1][k], rtol=1e-5, atol=1e-7)
    again = Trainer(tiny_config(workspace, tmp_path / "again", prompt_cache=str(tmp_path / "pc"),
                                heldout_prompt_files=[workspace["heldout"]]))
    again.close()
    assert (tmp_path / "pc" / CACHE_INDEX).stat().st_mtime_ns == written  # read, not rewritten
    assert len(again.setup.cache.blocks) == 1  # every prompt came from the mapped files


from tests.scale.train_helpers import workspace  # noqa: E402,F401  (fixture)
