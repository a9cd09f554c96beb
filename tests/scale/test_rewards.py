"""Rewards: weight-free built-ins against closed forms / PIL, module:function loading, clear errors."""

from __future__ import annotations

import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from scale.rewards import BUILTIN_REWARDS, ColorReward, Reward, brightness, get_reward, jpeg_compressibility

PROMPTS = ["a", "b"]


def _images() -> torch.Tensor:
    """(2, 3, 16, 16): a flat grey image and uniform noise."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 16, 16), 0.5)
    noise = torch.rand(3, 16, 16, generator=g)
    return torch.stack([flat, noise])


def test_jpeg_compressibility_is_minus_the_pil_jpeg_size_in_kb():
    images = _images()
    r = get_reward("jpeg_compressibility")(images, PROMPTS)
    for i in range(2):
        arr = np.round(images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert float(r[i]) == pytest.approx(-len(buf.getvalue()) / 1000.0, abs=1e-6)
    assert float(r[0]) > float(r[1])  # a flat image compresses better than noise
    lower_q = get_reward("jpeg_compressibility", quality=30)(images, PROMPTS)
    assert float(lower_q[1]) > float(r[1])


def test_brightness_and_color_closed_forms():
    images = _images()
    torch.testing.assert_close(get_reward("brightness")(images, PROMPTS), images.flatten(1).mean(1))
    assert float(brightness(images, PROMPTS)[0]) == pytest.approx(0.5)
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1.0
    blue = torch.zeros(2, 3, 4, 4)
    blue[:, 2] = 1.0
    to_red = get_reward("color")
    assert torch.equal(to_red(red, PROMPTS), torch.zeros(2))
    # ||(0, 0, 1) - (1, 0, 0)||^2 = 2 at every pixel
    torch.testing.assert_close(to_red(blue, PROMPTS), torch.full((2,), -2.0))
    grey = get_reward("color", target=(0.5, 0.5, 0.5))
    torch.testing.assert_close(grey(blue, PROMPTS), torch.full((2,), -0.75))  # 0.25 + 0.25 + 0.25
    with pytest.raises(ValueError, match="target"):
        ColorReward((1.0, 0.0))
    with pytest.raises(ValueError, match="target"):
        ColorReward((2.0, 0.0, 0.0))


def test_builtins_follow_the_protocol():
    for name in BUILTIN_REWARDS:
        reward = get_reward(name)
        assert isinstance(reward, Reward)
        out = reward(_images(), PROMPTS)
        assert out.shape == (2,) and out.dtype == torch.float32
    assert isinstance(jpeg_compressibility, Reward)


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    src = textwrap.dedent(
        """
        import torch

        def redness(images, prompts):
            return images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1)

        def wrong_shape(images, prompts):
            return torch.zeros(len(prompts) + 1)

        def not_finite(images, prompts):
            return torch.full((len(prompts),), float("nan"))

        class Scaled:
            def __init__(self, factor=1.0):
                self.factor = factor

            def __call__(self, images, prompts):
                return self.factor * torch.tensor([float(len(p)) for p in prompts])

        NOT_CALLABLE = 3
        """
    )
    (tmp_path / "my_rewards_mod.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_module_function_and_class_loading(user_module):
    images = _images()
    r = get_reward(f"{user_module}:redness")(images, PROMPTS)
    torch.testing.assert_close(r, images[:, 0].flatten(1).mean(1) - images[:, 1:].flatten(1).mean(1))
    scaled = get_reward(f"{user_module}:Scaled", factor=2.0)(images, ["abc", "a"])
    assert scaled.tolist() == [6.0, 2.0]


def test_reward_errors(user_module):
    images = _images()
    with pytest.raises(ValueError, match="unknown reward 'pickscor'.*brightness"):
        get_reward("pickscor")
    with pytest.raises(ValueError, match="'pickscore'.*adapter and needs its model directory"):
        get_reward("pickscore")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        get_reward(f"{user_module}:missing")
    with pytest.raises(TypeError, match="not callable"):
        get_reward(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        get_reward(f"{user_module}:wrong_shape")(images, PROMPTS)
    with pytest.raises(ValueError, match="non-finite"):
        get_reward(f"{user_module}:not_finite")(images, PROMPTS)
    with pytest.raises(ValueError, match="bad arguments"):
        get_reward("brightness", target=(1, 0, 0))
    with pytest.raises(ValueError, match="non-empty"):
        get_reward("")
    reward = get_reward("brightness")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(images[:, :1], PROMPTS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(images * 2, PROMPTS)
    with pytest.raises(ValueError, match="2 strings"):
        reward(images, ["only one"])
