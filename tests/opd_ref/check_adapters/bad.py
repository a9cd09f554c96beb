"""Adapters that break the ``opd-check`` contract (each must give exit status 2 and a clear message)."""

import torch

NOT_A_FUNCTION = 3


def returns_list(x, v, sigma, sigma_next, noise_level, x_next):
    return [x]


def unknown_key(x, v, sigma, sigma_next, noise_level, x_next):
    return {"logprob": x.flatten(1).sum(1)}


def wrong_mean_shape(x, v, sigma, sigma_next, noise_level, x_next):
    return {"mean": x.flatten(1)[:, :1].expand(-1, 2)}


def log_prob_not_per_sample(x, v, sigma, sigma_next, noise_level, x_next):
    return {"log_prob": x.flatten(1).sum(1, keepdim=True)}


def raises(x, v, sigma, sigma_next, noise_level, x_next):
    raise NotImplementedError("this adapter is a stub")


def too_few_arguments(x, v):
    return {"mean": x}


def kl_keepdim(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    return ((v_student - v_teacher) ** 2).flatten(1).sum(1, keepdim=True)


def kl_integer(x, v_student, v_teacher, sigma, sigma_next, noise_level):
    return torch.zeros(x.shape[0], dtype=torch.long)
