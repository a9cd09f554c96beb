"""Exact adapters for ``opd-check``: opd_ref's own kernels, and a CPS kernel written again here with
``torch.distributions`` as the density (an oracle independent of opd_ref's log-prob)."""

import math

import torch
from torch.distributions import Normal

from opd_ref import gaussian_log_prob, same_cov_kl, sde_step


def step(x, v, sigma, sigma_next, noise_level, x_next):
    """opd_ref's SDE kernel; raises at sigma = 1 (the exact coefficient is infinite there)."""
    kernel = sde_step(x, v, sigma, sigma_next, noise_level)
    return {"mean": kernel.mean, "std": kernel.std, "log_prob": gaussian_log_prob(x_next, kernel)}


def kl(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    student = sde_step(x, v_student, sigma, sigma_next, noise_level)
    teacher = sde_step(x, v_teacher, sigma, sigma_next, noise_level)
    return same_cov_kl(student.mean, teacher.mean, student.std)


def _per_sample(t, like):
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _cps(x, v, sigma, sigma_next, noise_level):
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std = sig_next * math.sin(noise_level * math.pi / 2)
    x0_hat, eps_hat = x - sig * v, x + (1 - sig) * v
    return (1 - sig_next) * x0_hat + torch.sqrt((sig_next**2 - std**2).clamp(min=0)) * eps_hat, std


def cps_step(x, v, sigma, sigma_next, noise_level, x_next):
    """CPS kernel; torch.distributions raises at sigma_next = 0 (std 0: no density)."""
    mean, std = _cps(x, v, sigma, sigma_next, noise_level)
    log_prob = Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1).sum(1)
    return {"mean": mean, "std": std, "log_prob": log_prob}


def cps_kl(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    """Exact KL of two CPS kernels (inf at sigma_next = 0, where the std is 0)."""
    mean_s, std = _cps(x, v_student, sigma, sigma_next, noise_level)
    mean_t, _ = _cps(x, v_teacher, sigma, sigma_next, noise_level)
    return ((mean_s - mean_t) ** 2 / (2 * std**2)).flatten(1).sum(1)


def ode_step(x, v, sigma, sigma_next, noise_level, x_next):
    """The Euler step (a deterministic kernel: mean only)."""
    return {"mean": x + _per_sample(sigma_next - sigma, x) * v}
