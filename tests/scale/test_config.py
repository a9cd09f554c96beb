"""The typed config: Flow-GRPO / DiffusionOPD defaults, JSON and TOML files, command-line overrides,
unknown keys and bad values rejected with the key named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from scale.config import FLOW_GRPO_TARGETS, ScaleConfig, apply_overrides, field_docs, load_config, parse_value


def test_defaults_are_the_sd35_medium_recipe():
    cfg = ScaleConfig().validate()
    assert (cfg.resolution, cfg.num_steps, cfg.noise_level, cfg.guidance_scale) == (512, 10, 0.7, 4.5)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.kernel, cfg.loss) == (32, 64, "sde", "opd_kl")
    assert cfg.lora_targets == FLOW_GRPO_TARGETS and len(FLOW_GRPO_TARGETS) == 8
    assert cfg.train_steps == [] and cfg.kernel_spec().sigma_one == "flowgrpo"


def test_every_field_is_documented_once_and_shown_by_help_and_train_help():
    """Each field's documentation lives in one place (its ``knob``) and reaches both readers:
    ``help(ScaleConfig)`` and ``opd-scale train --help`` (a fresh process, as a user runs it)."""
    import os
    import pydoc
    import subprocess
    import sys

    rows = field_docs()
    assert [name for name, *_ in rows] == [f.name for f in dataclasses.fields(ScaleConfig)]
    helped = " ".join(pydoc.render_doc(ScaleConfig, renderer=pydoc.plaintext).split())
    env = {**os.environ, "COLUMNS": "2000"}  # no wrapping inside hyphenated words (argparse breaks at "-")
    proc = subprocess.run([sys.executable, "-m", "scale.cli", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cli_help = " ".join(proc.stdout.split())  # argparse wraps lines: compare with whitespace collapsed
    for name, _typ, default, doc in rows:
        assert len(doc) > 10, name
        assert f"{name} (" in helped and " ".join(doc.split()) in helped, f"help(ScaleConfig) lacks {name}"
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in cli_help, f"opd-scale train --help lacks {flag}"
        assert " ".join(f"{doc} (default: {default!r})".split()) in cli_help, f"--help lacks the doc of {flag}"
    assert "--model STR local diffusers directory" in cli_help


def test_json_and_toml_files_and_overrides(tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"num_steps": 4, "tasks": ["a", "b"], "noise_level": 0.5, "gradient_checkpointing": True}))
    toml = tmp_path / "c.toml"
    toml.write_text('num_steps = 4\ntasks = ["a", "b"]\nnoise_level = 0.5\ngradient_checkpointing = true\n')
    a, b = load_config(js), load_config(toml)
    assert a == b and a.num_steps == 4 and a.tasks == ["a", "b"] and a.gradient_checkpointing is True
    c = load_config(js, ["num_steps=6", "tasks=x,y,z", 'train_steps=[0, 2]', "learning-rate=1e-3",
                         "gradient_checkpointing=false"])
    assert (c.num_steps, c.tasks, c.train_steps, c.learning_rate) == (6, ["x", "y", "z"], [0, 2], 1e-3)
    assert c.gradient_checkpointing is False
    assert apply_overrides(c, {"tasks": []}).tasks == []
    # a saved config loads back identical
    assert load_config(c.save(tmp_path / "back.json")) == c


@pytest.mark.parametrize("where", ["file", "override", "mapping"])
def test_unknown_key_is_an_error_naming_it(tmp_path, where):
    with pytest.raises(ValueError, match="unknown config key 'lerning_rate'"):
        if where == "file":
            path = tmp_path / "c.json"
            path.write_text(json.dumps({"lerning_rate": 1.0}))
            load_config(path)
        elif where == "override":
            load_config(None, ["lerning_rate=1"])
        else:
            apply_overrides(ScaleConfig(), {"lerning_rate": 1})


@pytest.mark.parametrize(
    "override,match",
    [
        ("num_steps=zero", "num_steps"),
        ("num_steps=0", "num_steps"),
        ("num_steps=2.5", "num_steps"),
        ("kernel=euler", "kernel"),
        ("noise_level=0", "noise_level"),
        ("learning_rate=nan", "learning_rate"),
        ("loss=opd_ode", "kernel"),
        ("loss=ode", "opd_ode"),
        ("loss=grpo", "loss"),
        ("train_steps=[0, 10]", "train_steps"),
        ("train_steps=[1, 1]", "duplicates"),
        ("gradient_checkpointing=maybe", "gradient_checkpointing"),
        ("heldout_prompt_files=a,b", "heldout_prompt_files"),
        ("nonsense", "key=value"),
        ("noise_level=inf", "noise_level must be a finite number"),
        ("adam_beta1=1.5", "adam_beta1 must lie in"),
        ("adam_beta2=-0.1", "adam_beta2 must lie in"),
        ("guidance_scale=nan", "guidance_scale must be a finite number"),
        ("guidance_scale=-1", "guidance_scale must be >= 0"),
        ("max_grad_norm=inf", "max_grad_norm must be a finite number"),
        ("keep_checkpoints=0", "keep_checkpoints must be > 0"),
        ("max_heldout_kl_ratio=0.5", "max_heldout_kl_ratio"),
    ],
)
def test_bad_values_name_the_key(override, match):
    base = ScaleConfig(micro_batch_size=2, batch_size=4)
    with pytest.raises(ValueError, match=match):
        apply_overrides(base, [override])


def test_per_task_lists_must_match_tasks():
    with pytest.raises(ValueError, match="prompt_files"):
        ScaleConfig(tasks=["a", "b"], prompt_files=["p"]).validate()
    with pytest.raises(ValueError, match="distinct"):
        ScaleConfig(tasks=["a", "a"]).validate()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "c.yaml"
    bad.write_text("a: 1")
    with pytest.raises(ValueError, match=r"\.json or \.toml"):
        load_config(bad)
    broken = tmp_path / "c.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(broken)
    assert parse_value("lora_targets", "attn.to_q") == ["attn.to_q"]


def test_loss_names_are_the_engine_methods():
    """Stage-2 losses are the engine's distillation methods plus CRD, each checked against its kernels."""
    from opd_ref.engine import OBJECTIVES

    from scale.config import LOSSES

    assert set(LOSSES) == {"opd_kl", "opd_ode", "ppo_opd", "k1", "vopd", "crd", "fwd_kl", "dmd", "bregman_kl",
                           "bregman_reverse_kl", "bregman_pearson_chi2", "bregman_jensen_shannon"}
    for loss in LOSSES:
        for kernel in ("sde", "cps", "ode"):
            cfg = ScaleConfig(loss=loss, kernel=kernel, noise_level=0.5)
            if kernel in OBJECTIVES[loss].kernels:
                cfg.validate()
            else:
                with pytest.raises(ValueError, match="kernel"):
                    cfg.validate()


# D17: the CRD mechanism switches are validated with the key in the message
@pytest.mark.parametrize("over,match", [
    ({"crd_ratio_to": "old"}, "crd_ratio_to"), ({"crd_implicit": "dsm"}, "crd_implicit"),
    ({"crd_guidance": 0.5}, "crd_guidance"), ({"crd_guidance": 3.0, "guidance_scale": 1.0, "reference_guidance_scale": 1.0}, "crd_guidance"),
    ({"crd_adaptive_kl": True}, "adaptive_kl"), ({"crd_kl_floor": 2.0}, "kl_floor"),
    ({"crd_kl_beta": -1.0}, "kl_beta"), ({"crd_elbo_levels": 0}, "elbo_levels")])
def test_bad_crd_switches_name_the_key(over, match):
    with pytest.raises(ValueError, match=match):
        ScaleConfig(model="m", **over).validate()
