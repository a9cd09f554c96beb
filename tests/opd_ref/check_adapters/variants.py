"""Adapters for ``opd-check`` with the deviations seen in public code (written for the tests, not
copied from any project): a CPS log-prob without its variance, an SDE mean with the sign of the score
term flipped, a velocity-MSE "KL", a log-prob detached from v, and a step that loses precision in
float32."""

import math

import torch
from torch.distributions import Normal


def _per_sample(t, like):
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def cps_no_variance(x, v, sigma, sigma_next, noise_level, x_next):
    """CPS kernel; log-prob = -mean over dims of (x' - mean)^2 (no 1/(2 s^2), no normaliser)."""
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sig_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sig_next) * (x - sig * v) + torch.sqrt((sig_next**2 - std**2).clamp(min=0)) * (x + (1 - sig) * v)
    return {"mean": mean, "std": std, "log_prob": -((x_next - mean) ** 2).flatten(1).mean(1)}


def _sde_parts(x, v, sigma, sigma_next, noise_level):
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std_t = noise_level * torch.sqrt(sig / (1 - sig))
    dt = sig_next - sig
    score_term = std_t**2 / (2 * sig) * (x + (1 - sig) * v)
    return dt, v, score_term, std_t * torch.sqrt(-dt)


def flipped_score(x, v, sigma, sigma_next, noise_level, x_next):
    """SDE step with the score correction subtracted instead of added; log-prob summed (around it)."""
    dt, v, score_term, std = _sde_parts(x, v, sigma, sigma_next, noise_level)
    mean = x + dt * (v - score_term)
    log_prob = Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1).sum(1)
    return {"mean": mean, "std": std, "log_prob": log_prob}


def detached_log_prob(x, v, sigma, sigma_next, noise_level, x_next):
    """The exact SDE log-density, but computed from a detached mean (no gradient reaches v)."""
    dt, v, score_term, std = _sde_parts(x, v, sigma, sigma_next, noise_level)
    mean = x + dt * (v + score_term)
    log_prob = Normal(mean.detach(), std.expand_as(mean)).log_prob(x_next).flatten(1).sum(1)
    return {"log_prob": log_prob}


def bf16_in_float32(x, v, sigma, sigma_next, noise_level, x_next):
    """The exact SDE mean, rounded through bfloat16 when called in float32."""
    dt, v, score_term, std = _sde_parts(x, v, sigma, sigma_next, noise_level)
    mean = x + dt * (v + score_term)
    if x.dtype == torch.float32:
        mean = mean.bfloat16().float()
    return {"mean": mean}


def velocity_mse(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    """'KL' = mean over dims of (v_s - v_t)^2, whatever the step."""
    return ((v_student - v_teacher) ** 2).flatten(1).mean(1)


def raises_on_last_step(x, v, sigma, sigma_next, noise_level, x_next):
    """The exact SDE mean, but it refuses the last step to sigma_next = 0 (where the SDE is defined)."""
    if bool((sigma_next == 0).any()):
        raise ValueError("sigma_next must be > 0")
    dt, v, score_term, _ = _sde_parts(x, v, sigma, sigma_next, noise_level)
    return {"mean": x + dt * (v + score_term)}
