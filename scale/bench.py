r"""``opd-scale bench``: the cost of the OPD update, measured as ratios within one run.

1. **Overhead** = time of one OPD-KL update (:meth:`scale.train.Trainer.distill_update`, i.e.
   :func:`opd_ref.engine.distill_update`) / the sum of its unavoidable model calls, each timed alone at
   the same shapes with its adapter already active (so adapter switching counts as overhead):
   :math:`K n (T\,t_{roll} + S\,t_{teacher} + S\,t_{fwd+bwd})` for :math:`K` tasks, :math:`n`
   micro-batches, :math:`T` rollout steps and :math:`S` trained steps. Target <= 1.05.
2. **Memory** = peak memory of one update with 40 rollout steps / with 10, the same trained steps.
   Target <= 1.1; and the peak of the 10-step update with gradient checkpointing, which must be lower
   than without. The memory an update adds on top of the weights: on CUDA
   ``torch.cuda.max_memory_allocated`` minus the memory allocated before the update; on CPU the peak
   bytes of live tensors created during the update (:class:`LiveTensorBytes`).
3. **Cost per update** of OPD-KL, PPO-OPD and GRPO (stage 1, :math:`\beta > 0`; a group needs two
   rollouts, so GRPO is compared per rollout), relative to OPD-KL.

On CUDA it adds images/s of ODE sampling and an MFU estimate: FLOPs of one transformer forward counted
by ``torch.utils.flop_counter.FlopCounterMode`` times the number of forwards (backward = 2 forwards),
divided by the wall time and the GPU's peak dense bf16 FLOP/s (``peak_tflops``).

Reference: ``diffusionopd`` (OPD cost vs GRPO), ``flowgrpo``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["run_bench", "LiveTensorBytes", "mmdit_forward_flops", "count_forward_flops", "sd35_medium_transformer_flops", "SD35_MEDIUM_TRANSFORMER"]

#: SD3.5-Medium's transformer config (MMDiT-X: dual attention in blocks 0-12, qk RMS-norm).
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(fns: Dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> Dict[str, float]:
    """Median wall time of each function, timed in interleaved rounds (one call of each per round,
    after one warm-up round) so that machine-load drift affects every quantity alike."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_forward_flops(transformer, batch: int, latent_hw: int, text_len: int, joint_dim: int, pooled_dim: int,
                        device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of one ``SD3Transformer2DModel`` forward counted by ``FlopCounterMode`` (matmuls and
    attention; 2 FLOPs per multiply-add), at batch ``batch``, latent side ``latent_hw`` and
    ``text_len`` text tokens. Works on the meta device (no memory, no weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = transformer.config.in_channels
    x = torch.zeros(batch, c, latent_hw, latent_hw, device=device, dtype=dtype)
    enc = torch.zeros(batch, text_len, joint_dim, device=device, dtype=dtype)
    pooled = torch.zeros(batch, pooled_dim, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(hidden_states=x, timestep=t, encoder_hidden_states=enc, pooled_projections=pooled, return_dict=False)
    return int(counter.get_total_flops())


def mmdit_forward_flops(config: Dict[str, Any], image_tokens: int, text_tokens: int, batch: int = 1) -> float:
    r"""FLOPs of one SD3 / SD3.5 (MMDiT, MMDiT-X) transformer forward by hand (2 FLOPs per multiply-add;
    per-sample terms such as adaLN and the timestep MLP are left out, < 0.1 %).

    With width :math:`d`, :math:`L` blocks, :math:`L_2` dual-attention blocks, :math:`N_i` image and
    :math:`N_t` text tokens, :math:`N = N_i + N_t`:

    .. math::
        F = Lig[24 d^2 (N_i + N_t) + 4 N^2 dig] - 18 d^2 N_t
            + L_2ig[8 d^2 N_i + 4 N_i^2 dig]
            + 2 N_i d\,(c_{in} + c_{out}) p^2 + 2 N_t d\, d_{joint}

    (per block: q, k, v, out and the 4x MLP = :math:`12 d^2` weights per token in each stream, the joint
    attention :math:`QK^	op` and :math:`AV`; the last block's text stream keeps only q, k, v; MMDiT-X
    adds a second, image-only attention; patch embedding, text embedding and output projection).

    Args:
        config: ``SD3Transformer2DModel`` config (dict-like).
        image_tokens: :math:`N_i = (H / 8 / p)^2` for SD3.
        text_tokens: :math:`N_t` (77 CLIP + T5 tokens).
        batch: samples (CFG doubles it).

    Returns:
        FLOPs (float).

    Reference: ``diffusionopd`` (cost of an update), SD3 (MMDiT), SD3.5 (MMDiT-X).
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    L = int(config["num_layers"])
    L2 = len(config.get("dual_attention_layers", ()) or ())
    Ni, Nt = int(image_tokens), int(text_tokens)
    N = Ni + Nt
    p = int(config["patch_size"])
    c_in = int(config["in_channels"])
    c_out = int(config.get("out_channels") or c_in)
    flops = L * (24 * d * d * N + 4 * N * N * d) - 18 * d * d * Nt
    flops += L2 * (8 * d * d * Ni + 4 * Ni * Ni * d)
    flops += 2 * Ni * d * (c_in + c_out) * p * p + 2 * Nt * d * int(config["joint_attention_dim"])
    return float(batch * flops)


def sd35_medium_transformer_flops(resolution: int = 512, text_len: int = 333) -> Dict[str, float]:
    """FLOPs of one SD3.5-Medium transformer forward (batch 1) at ``resolution`` px, counted on the
    meta device from :data:`SD35_MEDIUM_TRANSFORMER` (no weights needed), next to
    :func:`mmdit_forward_flops`. ``text_len`` = 77 CLIP + 256 T5 tokens (the pipeline default).

    Returns:
        dict with ``flops`` (counted), ``flops_by_hand``, ``params``, ``image_tokens``, ``text_tokens``.
    """
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    latent = resolution // 8
    flops = count_forward_flops(model, 1, latent, text_len, SD35_MEDIUM_TRANSFORMER["joint_attention_dim"],
                                SD35_MEDIUM_TRANSFORMER["pooled_projection_dim"])
    tokens = (latent // SD35_MEDIUM_TRANSFORMER["patch_size"]) ** 2
    return {"flops": float(flops), "params": float(sum(p.numel() for p in model.parameters())),
            "image_tokens": float(tokens), "text_tokens": float(text_len),
            "flops_by_hand": mmdit_forward_flops(SD35_MEDIUM_TRANSFORMER, tokens, text_len)}


class LiveTensorBytes:
    """Peak bytes of tensor storages created inside the block and alive at the same time (a
    ``TorchDispatchMode`` sees every op output, forward and backward; a weak-reference finalizer
    subtracts a storage when it is freed). Device independent; used on CPU, where torch keeps no
    allocator statistics. Storages that existed before the block (weights) are not counted."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __enter__(self) -> "LiveTensorBytes":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        seen = WeakIdKeyDictionary()
        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        if st not in seen:
                            n = st.nbytes()
                            seen[st] = n
                            outer.current += n
                            outer.peak = max(outer.peak, outer.current)
                            weakref.finalize(st, outer._free, n)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._mode.__exit__(*exc)
        return False


class _Peak:
    """Peak memory of a block: CUDA allocator statistics, or :class:`LiveTensorBytes` on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.working = 0.0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the update"
        else:
            self.live = LiveTensorBytes().__enter__()
            self.method = "peak bytes of live tensors created during the update (TorchDispatchMode, CPU)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.working = float(torch.cuda.max_memory_allocated(self.device) - self.before)
        else:
            self.live.__exit__(*exc)
            self.working = float(self.live.peak)
        return False


def _setup(tmp: Path, model: Optional[str], resolution: Optional[int]) -> Dict[str, Any]:
    """Model (tiny if none), a perturbed teacher LoRA, prompt files."""
    from scale.lora import add_lora, save_lora
    from scale.pipeline import load_pipeline

    if model is None:
        from scale.tiny import build_tiny_pipeline

        model = str(build_tiny_pipeline(tmp / "tiny"))
    pipe = load_pipeline(model)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora(pipe.transformer, "teacher", rank=4, alpha=8, init_std=0.05, generator=gen)
    teacher = save_lora(pipe.transformer, "teacher", tmp / "teacher")
    if resolution is None:
        resolution = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
    del pipe
    (tmp / "prompts.txt").write_text("\n".join(f"a photo of object number {i}" for i in range(8)) + "\n")
    return {"model": model, "teacher": str(teacher), "resolution": resolution}


def run_bench(model: Optional[str] = None, resolution: Optional[int] = None, repeats: int = 3,
              micro_batch_size: int = 1, dtype: str = "auto", trained_steps: tuple = (0, 4, 8),
              peak_tflops: Optional[float] = None, max_sequence_length: int = 32) -> Dict[str, Any]:
    """Run the measurements (and on CUDA images/s and MFU) and return them as a dict.

    Args:
        model: pipeline directory; ``None`` builds the tiny pipeline in a temporary directory.
        resolution: image side (default: the transformer's native size).
        repeats: timed repetitions per quantity (the median is reported).
        micro_batch_size: samples per forward.
        dtype: ``auto`` / ``float32`` / ``bfloat16`` / ``float16``.
        trained_steps: trained step indices (the same for 10 and 40 rollout steps).
        peak_tflops: the GPU's peak dense FLOP/s in TFLOP/s for MFU (default: 989 on H100/H200 bf16).
        max_sequence_length: T5 tokens per prompt.

    Returns:
        dict of measurements, ratios and the methods used.
    """
    from opd_ref.engine import KernelSpec, RolloutBatch, policy_rollout
    from scale.config import ScaleConfig
    from scale.train import STUDENT, Trainer
    from scale.updates import condition

    results: Dict[str, Any] = {"repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="opd_bench_") as tmpdir:
        tmp = Path(tmpdir)
        env = _setup(tmp, model, resolution)
        base = dict(model=env["model"], resolution=env["resolution"], num_steps=10, batch_size=micro_batch_size,
                    micro_batch_size=micro_batch_size, tasks=["t"], prompt_files=[str(tmp / "prompts.txt")],
                    teacher_loras=[env["teacher"]], train_steps=list(trained_steps), dtype=dtype,
                    max_sequence_length=max_sequence_length, checkpoint_every=0, sample_every=0, lora_rank=8, lora_alpha=16)
        counter = iter(range(10**6))

        def make(adapter: str = STUDENT, **over) -> Trainer:
            trainer = Trainer(ScaleConfig(**{**base, **over, "output_dir": str(tmp / f"run{next(counter)}")}))
            trainer.optimizer = trainer.make_optimizer(adapter)
            return trainer

        tr = make()
        s = tr.setup
        policy, dev = s.policy, s.device
        results["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        results["dtype"] = str(policy.dtype)
        results["resolution"] = env["resolution"]
        results["rollout_steps"] = tr.cfg.num_steps
        results["trained_steps"] = list(s.spec.trained_steps)
        results["micro_batch_size"] = micro_batch_size

        # ---- 1. overhead and 3. cost per update, timed in interleaved rounds ---------------
        cond = condition(s, [s.tasks[0].prompts[0]] * micro_batch_size)
        x = torch.randn((micro_batch_size,) + policy.event_shape, device=dev)
        sigma = float(s.sigmas[1])
        params = policy.trainable_parameters(STUDENT)
        calls = 10

        def no_grad_calls(adapter):
            # the adapter is switched before the timed calls: the floor is pure model time
            def fn():
                with torch.no_grad(), policy.active(adapter):
                    for _ in range(calls):
                        policy.velocity(x, sigma, cond)
            return fn

        def fwd_bwd():
            with policy.active(STUDENT):
                for _ in range(calls):
                    policy.velocity(x, sigma, cond).square().sum().backward()
            for p in params:
                p.grad = None

        # GRPO: one prompt x group_size = the same number of rollouts, KL to the reference on
        tr_ppo = make(loss="ppo_opd")
        tr_grpo = make("teacher_0", stage1_steps=1, teacher_loras=[""], rewards=["brightness"],
                       group_size=max(2, micro_batch_size), batch_size=1, kl_beta=0.04, distill_steps=0)
        counters = {name: iter(range(10**6)) for name in ("opd", "ppo", "grpo")}
        med = _interleaved_medians({
            "opd_kl_update": lambda: tr.distill_update(0, next(counters["opd"])),
            "ppo_opd_update": lambda: tr_ppo.distill_update(0, next(counters["ppo"])),
            "grpo_update": lambda: tr_grpo.grpo_update(0, 0, next(counters["grpo"])),
            "rollout_forwards": no_grad_calls(STUDENT),
            "teacher_forwards": no_grad_calls(s.tasks[0].adapter),
            "student_forward_backward": fwd_bwd,
        }, dev, repeats)
        t_update = med["opd_kl_update"]
        t_roll, t_teacher, t_fb = (med[k] / calls for k in ("rollout_forwards", "teacher_forwards",
                                                             "student_forward_backward"))
        n_micro = tr.cfg.batch_size // tr.cfg.micro_batch_size
        T, S = tr.cfg.num_steps, len(s.spec.trained_steps)
        floor = len(s.tasks) * n_micro * (T * t_roll + S * (t_teacher + t_fb))
        results["overhead"] = {
            "update_s": t_update, "rollout_forward_s": t_roll, "teacher_forward_s": t_teacher,
            "student_forward_backward_s": t_fb, "sum_of_model_calls_s": floor, "ratio": t_update / floor,
            "target": 1.05,
        }
        grpo_rollouts = tr_grpo.cfg.group_size
        results["cost_per_update"] = {
            "opd_kl_s": t_update, "ppo_opd_s": med["ppo_opd_update"], "grpo_s": med["grpo_update"],
            "ppo_opd_over_opd_kl": med["ppo_opd_update"] / t_update,
            "grpo_over_opd_kl_per_rollout": (med["grpo_update"] / grpo_rollouts) / (t_update / micro_batch_size),
            "rollouts_per_update": {"opd_kl": micro_batch_size * len(s.tasks), "grpo": grpo_rollouts},
        }
        del tr_ppo, tr_grpo

        # ---- 2. memory: 40 vs 10 rollout steps; 10 steps with gradient checkpointing -------
        mem = {}
        for key, over in (("10", {}), ("40", {"num_steps": 40}), ("10_ckpt", {"gradient_checkpointing": True})):
            trm = make(**over)
            trm.distill_update(0, 0)  # warm-up (optimizer state allocated)
            with _Peak(dev) as peak:
                trm.distill_update(0, 1)
            mem[key] = peak
            del trm
        results["memory"] = {
            "method": mem["10"].method,
            "peak_bytes_10": mem["10"].working, "peak_bytes_40": mem["40"].working,
            "ratio_40_over_10": mem["40"].working / mem["10"].working, "target": 1.1,
            "peak_bytes_10_gradient_checkpointing": mem["10_ckpt"].working,
            "ratio_checkpointing_over_plain": mem["10_ckpt"].working / mem["10"].working,
        }

        # ---- GPU only: images/s and MFU --------------------------------------------------
        if dev.type == "cuda":
            cfg = s.transformer.config
            flops_fwd = count_forward_flops(s.transformer, 2 * micro_batch_size, policy.event_shape[1],
                                            int(cond.hidden.shape[1]), int(cfg.joint_attention_dim),
                                            int(cfg.pooled_projection_dim), device=dev, dtype=policy.dtype)
            peak = (peak_tflops or 989.0) * 1e12

            def sample():
                batch = RolloutBatch(cond, micro_batch_size, torch.Generator(device=dev).manual_seed(5))
                policy_rollout(policy, STUDENT, batch, s.sigmas, KernelSpec("ode"))

            sample_s = _interleaved_medians({"s": sample}, dev, repeats)["s"]
            update_flops = len(s.tasks) * n_micro * flops_fwd * (T + S * (1 + 3))  # rollout + teacher + fwd/bwd
            results["gpu"] = {
                "images_per_s": micro_batch_size / sample_s,
                "cfg_forward_flops": flops_fwd,
                "update_flops": update_flops,
                "mfu_update": update_flops / t_update / peak,
                "achieved_tflops_update": update_flops / t_update / 1e12,
                "achieved_tflops_sampling": T * flops_fwd / sample_s / 1e12,
                "mfu_sampling": T * flops_fwd / sample_s / peak,
                "peak_tflops": peak / 1e12,
            }
    return results
