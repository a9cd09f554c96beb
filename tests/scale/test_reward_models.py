"""Reward adapters on local model directories (issue 12, point 4), on tiny random-weight CLIP models
built from configs and saved with save_pretrained (scale.tiny.build_tiny_rewards).  The oracles
preprocess with PIL and score with the formulas of each paper written anew here."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from scale.reward_models import levenshtein
from scale.rewards import get_reward, parse_reward_spec
from scale.tiny import TINY_CLIP_SIZES, TINY_GENEVAL, build_tiny_rewards

PROMPTS = ["a photo of a cat", "a red car", 'a sign that says "open"']
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP normalisation
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    return build_tiny_rewards(tmp_path_factory.mktemp("rewards") / "tiny", seed=0)


def _images():
    return torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _pixels(images, side):
    """CLIP preprocessing written out with PIL: uint8, bicubic resize of the short side, centre crop,
    (x / 255 - mean) / std."""
    from PIL import Image

    out = []
    for img in images:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        pil = Image.fromarray(arr)
        w, h = pil.size
        scale = side / min(w, h)
        pil = pil.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        w, h = pil.size
        left, top = (w - side) // 2, (h - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
        x = (np.asarray(pil, dtype=np.float64) / 255.0 - MEAN) / STD
        out.append(torch.from_numpy(x).permute(2, 0, 1))
    return torch.stack(out).float()


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5


def _cos(directory, images, prompts):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    with torch.no_grad():
        e_i = _features(model.get_image_features(pixel_values=_pixels(images, TINY_CLIP_SIZES["image_size"])))
        t = tok(prompts, padding=True, truncation=True, max_length=TINY_CLIP_SIZES["max_length"], return_tensors="pt")
        e_t = _features(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    e_i, e_t = e_i.double(), e_t.double()
    cos = (e_i * e_t).sum(-1) / (e_i.norm(dim=-1) * e_t.norm(dim=-1))
    return cos, model, e_i


def test_pickscore_hpsv2_clipscore_formulas(reward_dirs):
    d = reward_dirs["pickscore"]
    images = _images()
    cos, model, _ = _cos(d, images, PROMPTS)
    pick = get_reward(f"pickscore:{d}")(images, PROMPTS)
    torch.testing.assert_close(pick.double(), model.logit_scale.exp().double() * cos, rtol=0, atol=1e-4)
    torch.testing.assert_close(get_reward(f"hpsv2:{d}")(images, PROMPTS).double(), cos, rtol=0, atol=1e-5)
    cos_prefixed, _, _ = _cos(d, images, ["A photo depicts " + p for p in PROMPTS])
    clip = get_reward(f"clipscore:{d}")(images, PROMPTS)
    torch.testing.assert_close(clip.double(), 2.5 * cos_prefixed.clamp(min=0), rtol=0, atol=1e-5)
    assert float(cos.std()) > 1e-3  # the images and prompts are told apart (random weights, but not constant)


def test_aesthetic_head_on_the_unit_image_embedding(reward_dirs):
    d = reward_dirs["aesthetic"]
    images = _images()
    _, _, e_i = _cos(d, images, PROMPTS)
    head = torch.load(f"{d}/aesthetic_mlp.pth", weights_only=True)
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    h = e_i / e_i.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # Linear layers; dropout in between is off at evaluation; no activations
        h = h @ head[f"layers.{i}.weight"].double().T + head[f"layers.{i}.bias"].double()
    got = get_reward(f"aesthetic:{d}")(images, PROMPTS)
    torch.testing.assert_close(got.double(), h[:, 0], rtol=0, atol=1e-5)


def test_weighted_sum_of_rewards(reward_dirs):
    images = _images()
    r = get_reward("0.5*brightness + 2*color")(images, PROMPTS)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    want = 0.5 * images.flatten(1).mean(1) - 2 * ((images - red) ** 2).sum(1).flatten(1).mean(1)
    torch.testing.assert_close(r, want, rtol=0, atol=1e-6)
    spec = f"0.5*pickscore:{reward_dirs['pickscore']} + 0.5*aesthetic:{reward_dirs['aesthetic']}"
    both = get_reward(spec)(images, PROMPTS)
    parts = [get_reward(f"{k}:{reward_dirs[k]}")(images, PROMPTS) for k in ("pickscore", "aesthetic")]
    torch.testing.assert_close(both, 0.5 * parts[0] + 0.5 * parts[1], rtol=0, atol=1e-6)
    terms = parse_reward_spec("1e-1*brightness+3*color + jpeg_compressibility")
    assert [(t.weight, t.name) for t in terms] == [(0.1, "brightness"), (3.0, "color"), (1.0, "jpeg_compressibility")]
    assert parse_reward_spec("aesthetic:/m/sac+logos")[0].argument == "/m/sac+logos"  # '+' inside a path
    for bad, match in (("0.5*brightness + ", "empty term"), ("1e999*brightness", "must be finite"),
                       ("ocr:no_function", "takes 'module:function'"), ("aesthetic:", "needs its model directory")):
        with pytest.raises(ValueError, match=match):
            parse_reward_spec(bad)
    with pytest.raises(ValueError, match="only accepted for a single reward"):
        get_reward("brightness + color", target=(0, 1, 0))


def test_missing_or_wrong_directory_is_a_clear_error(reward_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reward 'pickscore:.*nowhere'.*does not exist"):
        get_reward(f"pickscore:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="reward 'hpsv2:.*empty'.*no config.json"):
        get_reward(f"hpsv2:{tmp_path / 'empty'}")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model, expected a CLIP model"):
        get_reward(f"clipscore:{bert}")
    with pytest.raises(ValueError, match="exactly one aesthetic head file"):  # a CLIP dir without a head
        get_reward(f"aesthetic:{reward_dirs['pickscore']}")
    import shutil

    aes = tmp_path / "aes"
    shutil.copytree(reward_dirs["aesthetic"], aes)
    head = torch.load(aes / "aesthetic_mlp.pth", weights_only=True)
    torch.save({"fc.weight": head["layers.0.weight"]}, aes / "aesthetic_mlp.pth")
    with pytest.raises(ValueError, match="layers.N.weight"):
        get_reward(f"aesthetic:{aes}")
    head["layers.0.weight"] = head["layers.0.weight"][:, :-1]
    torch.save(head, aes / "aesthetic_mlp.pth")
    with pytest.raises(ValueError, match="takes 15 inputs, the CLIP image embedding has 16"):
        get_reward(f"aesthetic:{aes}")


def test_levenshtein_known_values():
    for a, b, d in (("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0),
                    ("opem", "opennow", 4)):
        assert levenshtein(a, b) == d == levenshtein(b, a)


@pytest.fixture()
def user_fns(tmp_path, monkeypatch):
    (tmp_path / "ocr_geneval_mod.py").write_text(textwrap.dedent("""
        import torch
        TEXTS = []

        def read(images):
            return list(TEXTS[: images.shape[0]])

        def evaluate(images, prompts, metadata):
            return torch.tensor([float(len(m["include"])) for m in metadata])
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield sys.modules.setdefault("ocr_geneval_mod", __import__("ocr_geneval_mod"))
    sys.modules.pop("ocr_geneval_mod", None)


def test_ocr_adapter_is_flowgrpos_edit_distance_reward(user_fns):
    reward = get_reward("ocr:ocr_geneval_mod:read")
    prompts = ['a sign that says "Open Now"', 'a sign that says "Open Now"', 'a sign that says "Open Now"',
               "a poster", "a poster"]
    meta = [{}, {}, {}, {"text": "sale"}, {"text": "sale"}]
    user_fns.TEXTS[:] = ["OPEN now!", "opem", "", "sal", "xxxxxxxxxx"]
    # targets "opennow" (7 letters) and "sale": contained -> 1; lev("opem", "opennow") = 4; "" -> 7 -> 0;
    # lev("sal", "sale") = 1 of 4; lev("xxxxxxxxxx", "sale") = 10 > 4 is clipped to 4 -> 0
    want = [1.0, 1 - 4 / 7, 0.0, 1 - 1 / 4, 0.0]
    torch.testing.assert_close(reward(torch.rand(5, 3, 8, 8), prompts, meta), torch.tensor(want))
    with pytest.raises(ValueError, match="no double-quoted text"):
        reward(torch.rand(1, 3, 8, 8), ["a poster"], [{}])


def test_geneval_adapter_checks_the_metadata_contract(user_fns):
    reward = get_reward("geneval:ocr_geneval_mod:evaluate")
    got = reward(torch.rand(2, 3, 8, 8), [m["prompt"] for m in TINY_GENEVAL[:2]], TINY_GENEVAL[:2])
    assert got.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        reward(torch.rand(1, 3, 8, 8), ["a cat"], [{}])


def test_cli_build_tiny_rewards(tmp_path, capsys):
    from scale.cli import main

    out = tmp_path / "r"
    assert main(["build-tiny-rewards", str(out), "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"pickscore: {out / 'pickscore'}" in printed and "geneval_prompts" in printed
    reward = get_reward(f"0.5*pickscore:{out / 'pickscore'} + 0.5*aesthetic:{out / 'aesthetic'}")
    assert reward(_images(), PROMPTS).shape == (3,)
    from scale.data import load_prompts

    assert load_prompts(out / "geneval_metadata.jsonl").metadata == TINY_GENEVAL
    assert len(load_prompts(out / "ocr_prompts.txt").prompts) == 4
    assert main(["build-tiny-rewards", str(out)]) == 2  # not empty: refused
