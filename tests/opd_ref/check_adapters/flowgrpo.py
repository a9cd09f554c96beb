"""A Flow-GRPO-style SDE step and per-step KL, as adapters for ``opd-check`` (tests and docs).

Written for this suite from the formulas of Flow-GRPO's paper and of docs/differences.md, not copied
from any project.  It has the three traits that public Flow-GRPO-style code has:

* ``"std"`` is the SDE coefficient ``std_t = a sqrt(sigma / (1 - sigma))``, not the step std
  ``std_t sqrt(|dt|)``;
* the log-prob is averaged over the event dims;
* at ``sigma = 1`` the denominator of ``std_t`` uses the next sigma;

and its KL divides by ``2 std_t^2`` (no ``|dt|``) and averages over dims.

    opd-check step tests/opd_ref/check_adapters/flowgrpo.py:step
    opd-check kl tests/opd_ref/check_adapters/flowgrpo.py:kl
"""

import math

import torch


def _per_sample(t, like):
    """(B,) -> (B, 1, ..., 1) to broadcast against like (B, *event)."""
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def _event_dims(x):
    return tuple(range(1, x.dim()))


def _std_t(sigma, sigma_next, noise_level):
    # sigma = 1 would divide by zero: use the next sigma there
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))


def _mean(x, v, sigma, sigma_next, std_t):
    dt = sigma_next - sigma
    return x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt


def step(x, v, sigma, sigma_next, noise_level, x_next):
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std_t = _std_t(sig, sig_next, noise_level)
    mean = _mean(x, v, sig, sig_next, std_t)
    step_std = std_t * torch.sqrt(sig - sig_next)
    log_prob = (-((x_next.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std)
                - math.log(math.sqrt(2 * math.pi)))
    return {"mean": mean, "std": std_t, "log_prob": log_prob.mean(dim=_event_dims(x))}


def kl(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    sig, sig_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std_t = _std_t(sig, sig_next, noise_level)
    gap = _mean(x, v_student, sig, sig_next, std_t) - _mean(x, v_teacher, sig, sig_next, std_t)
    return (gap**2 / (2 * std_t**2)).mean(dim=_event_dims(x))
