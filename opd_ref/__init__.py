"""opd_ref: the math of on-policy distillation for flow-matching diffusion models.

Every derivation D1-D19 of the docs (docs/derivations/, one page each) is implemented once here
(D17 and the D18 updates in ``opd_ref.engine``);
``toys`` and ``scale`` import it.
Conventions: ``x_sigma = (1 - sigma) x_data + sigma eps``, ``v = eps - x_data``, sampling runs
sigma 1 -> 0; log-probs and KLs are per sample and summed over event dims (docs/conventions.md).
How ``toys`` and ``scale`` train through the one engine: docs/architecture.md.
"""

from opd_ref.bregman import bregman_divergence, bregman_generator_surrogate, bregman_gradient_weight
from opd_ref.chains import (
    LinearGaussianChain,
    gaussian_kl_full,
    linear_gaussian_path_kl,
    path_kl,
    per_step_kls,
    sequence_log_ratio,
)
from opd_ref.crd import center_in_groups, crd_loss, implicit_reward, uncentered_reward_loss
from opd_ref.dimo import dimo_generator_surrogate, dimo_psi_loss, generalized_jeffrey, jeffrey_logit_gradient
from opd_ref.distribution_matching import distribution_matching_surrogate
from opd_ref.divergences import (
    cps_log_prob_flowgrpo,
    diag_gaussian_kl,
    flowgrpo_step_kl,
    gaussian_log_prob,
    gaussian_log_prob_dim_mean,
    kernel_kl,
    kernel_log_ratio,
    same_cov_kl,
)
from opd_ref.elbo import elbo_log_ratio, ode_log_likelihood, weighted_denoising_loss
from opd_ref.gopd import gopd_sample_loss, gopd_step_loss, gopd_target_gaussian
from opd_ref.kernels import (
    GaussianStep,
    cps_kl_coefficient,
    cps_step,
    kernel_coefficients,
    ode_step,
    sde_kl_coefficient,
    sde_std_t,
    sde_step,
    sigma_to_t,
    t_to_sigma,
)
from opd_ref.losses import (
    deterministic_limit_weight,
    ode_matching_loss,
    opd_kl_loss,
    ppo_surrogate_loss,
    sde_kl_rescaled,
)
from opd_ref.tilting import (
    importance_weighted_reward,
    self_normalised_weights,
    tilted_kl_decomposition,
    tilted_log_ratio,
)

__version__ = "0.1.0"

__all__ = [
    "GaussianStep",
    "sde_step",
    "cps_step",
    "ode_step",
    "sde_std_t",
    "sde_kl_coefficient",
    "cps_kl_coefficient",
    "kernel_coefficients",
    "sigma_to_t",
    "t_to_sigma",
    "gaussian_log_prob",
    "gaussian_log_prob_dim_mean",
    "cps_log_prob_flowgrpo",
    "same_cov_kl",
    "diag_gaussian_kl",
    "flowgrpo_step_kl",
    "kernel_kl",
    "kernel_log_ratio",
    "opd_kl_loss",
    "ode_matching_loss",
    "ppo_surrogate_loss",
    "sde_kl_rescaled",
    "deterministic_limit_weight",
    "implicit_reward",
    "center_in_groups",
    "crd_loss",
    "uncentered_reward_loss",
    "distribution_matching_surrogate",
    "bregman_divergence",
    "bregman_gradient_weight",
    "bregman_generator_surrogate",
    "gopd_sample_loss",
    "gopd_step_loss",
    "gopd_target_gaussian",
    "per_step_kls",
    "path_kl",
    "sequence_log_ratio",
    "LinearGaussianChain",
    "gaussian_kl_full",
    "linear_gaussian_path_kl",
    "tilted_log_ratio",
    "tilted_kl_decomposition",
    "importance_weighted_reward",
    "self_normalised_weights",
    "ode_log_likelihood",
    "weighted_denoising_loss",
    "elbo_log_ratio",
    "generalized_jeffrey",
    "jeffrey_logit_gradient",
    "dimo_generator_surrogate",
    "dimo_psi_loss",
]
