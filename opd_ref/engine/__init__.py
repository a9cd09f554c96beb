r"""The one engine: everything from the noise draw to ``optimizer.step()``, for a 2D toy and SD3.5 alike.

* :class:`KernelSpec` — the bound transition kernel (kind, noise level, sigma = 1 rule), D2;
* :func:`rollout` and :class:`Trajectory` — one rollout loop, one stored-trajectory type;
* :data:`OBJECTIVES` — one registry of per-step objectives under one set of method names
  (:data:`METHODS`), each taking a :class:`StepInputs`;
* :func:`group_advantages` — the one group-advantage normaliser;
* :func:`distill_update`, :func:`grpo_update`, :func:`crd_update` — the updates, over the
  :class:`Policy` protocol (a model provides velocities of named adapters, their parameters and a
  context in which an adapter is active);
* :func:`nft_update` — DiffusionNFT (forward process); GRPO-Guard is the ``grpo_guard`` objective of
  :func:`grpo_update` (D18).

``toys`` and ``scale`` provide only a policy, rewards and IO.

Reference: ``diffusionopd``, ``flowgrpo``, ``crd``.
"""

from opd_ref.engine.crd_mechanisms import IMPLICIT_REWARDS, RATIO_REFERENCES, CRDMechanisms
from opd_ref.engine.kernel import KERNEL_KINDS, SIGMA_ONE_RULES, KernelSpec, StepCoefficients
from opd_ref.engine.objectives import (
    KL_FORMS,
    METHODS,
    OBJECTIVES,
    RATIO_FORMS,
    Objective,
    ObjectiveSpec,
    StepInputs,
    StepLoss,
    group_advantages,
    register,
)
from opd_ref.engine.policy import LOCAL, Collective, Policy, RolloutBatch, initial_noise
from opd_ref.engine.trajectory import NonFiniteError, Trajectory, Transition, check_finite, rollout
from opd_ref.engine.updates import (
    AdvantageSpec,
    DistillTask,
    UpdateSpec,
    crd_update,
    distill_update,
    grpo_update,
    optimizer_step,
    path_divergence,
    policy_rollout,
)
from opd_ref.engine.teachers import nft_update

__all__ = [
    "KERNEL_KINDS", "SIGMA_ONE_RULES", "KernelSpec", "StepCoefficients",
    "KL_FORMS", "RATIO_FORMS", "METHODS", "OBJECTIVES", "Objective", "ObjectiveSpec", "StepInputs", "StepLoss",
    "group_advantages", "register",
    "LOCAL", "Collective", "Policy", "RolloutBatch", "initial_noise",
    "NonFiniteError", "Trajectory", "Transition", "check_finite", "rollout",
    "AdvantageSpec", "DistillTask", "UpdateSpec", "crd_update", "distill_update", "grpo_update",
    "optimizer_step", "path_divergence", "policy_rollout",
    "CRDMechanisms", "RATIO_REFERENCES", "IMPLICIT_REWARDS",
    "nft_update",
]
