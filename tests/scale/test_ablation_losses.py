"""The distillation-objective ablation (D16) at scale: ``opd-scale train`` accepts the new per-step
objectives (``scale.config.LOSSES`` is the engine registry's distillation family).  The tiny stage-2
runs with them are in tests/scale/test_train.py (``test_one_tiny_update_with_an_ablation_loss``), which
shares that module's tiny workspace."""

from __future__ import annotations

import pytest

from scale.config import LOSSES, ScaleConfig

NEW = ("fwd_kl", "dmd", "bregman_kl", "bregman_reverse_kl", "bregman_pearson_chi2", "bregman_jensen_shannon")


@pytest.mark.parametrize("loss", NEW)
def test_config_accepts_the_ablation_losses(loss):
    assert loss in LOSSES
    for kernel in ("sde", "cps"):
        ScaleConfig(loss=loss, kernel=kernel, noise_level=0.5).validate()
    with pytest.raises(ValueError, match="kernel"):
        ScaleConfig(loss=loss, kernel="ode").validate()
