r"""The update functions of the engine, written once over the policy protocol.

* :func:`distill_update` — on-policy distillation from :math:`K` teachers (D3, D13): for each task in
  round-robin order, student rollouts, then per trained step the chosen objective against the task's
  teacher, accumulated with weight :math:`1/K`, then one optimiser step:

  .. math::
      \nabla L(\theta) = \frac1K\sum_{k=1}^K \sum_b w_b\,\frac{1}{B_b}\sum_{i\in b}
          \sum_{n\in\mathcal T}\nabla\ell_n(\theta; x^{(i)}_n)

* :func:`grpo_update` — Flow-GRPO: group rollouts, group-normalised rewards, ``epochs`` passes of the
  clipped-ratio objective plus :math:`\beta` times the per-step KL to the reference, one optimiser
  step per pass;
* :func:`crd_update` — CRD: the implicit reward :math:`\hat r = \beta\sum_n\log(\pi_\theta/\pi_{ref})`
  centred within each group against the centred reward (D8).

Each trained step is re-evaluated with gradient and back-propagated on its own (memory flat in the
number of steps), inside ``policy.active(trained adapter)``, so a recomputed forward (gradient
checkpointing) sees the same adapter.  The sum over steps is the path KL of the chain rule (D3) over
the trained steps.

Reference: ``diffusionopd`` (multi-task OPD, round robin), ``flowgrpo`` (GRPO), ``crd``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref.engine.kernel import KernelSpec
from opd_ref.engine.objectives import ObjectiveSpec, StepInputs, group_advantages
from opd_ref.engine.policy import LOCAL, Collective, Policy, RolloutBatch, initial_noise
from opd_ref.engine.trajectory import NonFiniteError, Trajectory, rollout

__all__ = [
    "UpdateSpec",
    "DistillTask",
    "AdvantageSpec",
    "policy_rollout",
    "distill_update",
    "grpo_update",
    "crd_update",
    "optimizer_step",
    "path_divergence",
]

Reward = Callable[[Tensor, RolloutBatch], Tensor]


@dataclass(frozen=True)
class UpdateSpec:
    r"""What every update of a run shares: the grid, the kernel, the per-step objective, the trained
    steps and the gradient clipping; validated once here.

    .. math::
        \mathcal T \subseteq \{n : s_n > 0\}\ \text{(stochastic objectives)},\qquad
        \mathcal T = \{0, \dots, N-1\}\ \text{by default}

    Args:
        sigmas: ``(N + 1,)`` strictly decreasing grid.
        kernel: :class:`~opd_ref.engine.kernel.KernelSpec` of the rollouts.
        objective: :class:`~opd_ref.engine.objectives.ObjectiveSpec`.
        trained_steps: step indices trained; empty = every step that has a density (every step
            for ``opd_ode``).
        max_grad_norm: clip the gradient's global norm to this (0: no clipping).

    Reference: ``diffusionopd`` (trained subset of steps), ``flowgrpo``.
    """

    sigmas: Tensor
    kernel: KernelSpec
    objective: ObjectiveSpec
    trained_steps: Tuple[int, ...] = ()
    max_grad_norm: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, KernelSpec):
            raise TypeError(f"UpdateSpec.kernel must be a KernelSpec, got {type(self.kernel).__name__}")
        if not isinstance(self.objective, ObjectiveSpec):
            raise TypeError(f"UpdateSpec.objective must be an ObjectiveSpec, got {type(self.objective).__name__}")
        obj = self.objective.objective
        if self.kernel.kind not in obj.kernels:
            raise ValueError(
                f"objective {obj.name!r} is defined for kernels {obj.kernels}, got kernel {self.kernel.kind!r}"
            )
        if obj.family == "rl" and self.objective.kl_form == "flowgrpo" and self.kernel.kind != "sde":
            raise ValueError(f"kl_form 'flowgrpo' is defined for the sde kernel only, got kernel {self.kernel.kind!r}")
        levels = self.kernel.check_grid(self.sigmas)
        coefs = [self.kernel.coefficients(s, sn) for s, sn in zip(levels, levels[1:])]
        stochastic = [n for n, c in enumerate(coefs) if c.stochastic]
        steps = tuple(int(t) for t in self.trained_steps)
        every_level = obj.name == "opd_ode" or obj.family == "nft"  # no density needed
        if not steps:
            steps = tuple(range(len(coefs))) if every_level else tuple(stochastic)
        bad = [t for t in steps if not 0 <= t < len(coefs)]
        if bad:
            raise ValueError(f"UpdateSpec.trained_steps must lie in [0, {len(coefs)}), got {bad}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"UpdateSpec.trained_steps has duplicates: {list(steps)}")
        det = [t for t in steps if t not in stochastic]
        if det and not every_level:
            raise ValueError(
                f"UpdateSpec.trained_steps {det} are deterministic under kernel {self.kernel.kind!r} (std 0: no "
                f"density, no KL), objective {obj.name!r} needs stochastic steps; stochastic steps: {stochastic}"
            )
        if not steps:
            raise ValueError("UpdateSpec: no step to train (the kernel has no stochastic step)")
        m = self.max_grad_norm
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < math.inf:
            raise ValueError(f"UpdateSpec.max_grad_norm must be a finite float >= 0, got {m!r}")
        object.__setattr__(self, "trained_steps", tuple(sorted(steps)))


@dataclass(frozen=True)
class DistillTask:
    r"""One distillation task of an update: its teacher adapter and this process's rollout batches.

    .. math:: L_k = \textstyle\sum_b w_b\,\frac1{B_b}\sum_{i\in b}\sum_{n\in\mathcal T}\ell_n

    Reference: ``diffusionopd``.

    Attributes:
        teacher: the teacher's adapter name.
        batches: :class:`~opd_ref.engine.policy.RolloutBatch` es (weights sum to 1 over all processes).
        name: for the statistics (``loss/NAME``, ``div/NAME``).
    """

    teacher: Optional[str]
    batches: Sequence[RolloutBatch]
    name: str = ""


@dataclass(frozen=True)
class AdvantageSpec:
    r"""The group-advantage normaliser :math:`A = (r - \bar r)/(\mathrm{std}_{ddof} + \epsilon)`,
    optionally clipped to :math:`[-c, c]` (Flow-GRPO clips to 5).

    .. math:: A = \mathrm{clip}\big((r - \bar r)/(\mathrm{std}_{ddof}(r) + \epsilon), -c, c\big)

    Reference: ``flowgrpo``.

    Args:
        ddof: 0 (Flow-GRPO) or 1.
        eps: :math:`\epsilon > 0`.
        clip: :math:`c > 0` or ``None``.
        group_size: ``None``: a group's rewards are normalised together; an int ``G``: in consecutive
            chunks of ``G`` (one batch carrying several groups, e.g. several prompts' or stacked toy
            runs' groups; the group's size must be a multiple of ``G``).
    """

    ddof: int = 0
    eps: float = 1e-4
    clip: Optional[float] = None
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        # validated here, once (before: eps = NaN was accepted and every advantage came out NaN)
        if self.ddof not in (0, 1) or isinstance(self.ddof, bool):
            raise ValueError(f"AdvantageSpec.ddof must be 0 or 1, got {self.ddof!r}")
        e = self.eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e < math.inf:
            raise ValueError(f"AdvantageSpec.eps must be a positive finite float, got {e!r}")
        c = self.clip
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < math.inf):
            raise ValueError(f"AdvantageSpec.clip must be a positive finite float or None, got {c!r}")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2):
            raise ValueError(f"AdvantageSpec.group_size must be an int >= 2 or None, got {g!r}")

    def __call__(self, rewards: Tensor) -> Tensor:
        g = self.group_size
        if g is not None and (rewards.dim() != 1 or rewards.shape[0] % g):
            raise ValueError(f"rewards must be (B,) with B a multiple of group_size {g}, got {tuple(rewards.shape)}")
        r = rewards if g is None else rewards.reshape(-1, g)
        adv = group_advantages(r, ddof=self.ddof, eps=self.eps).reshape(rewards.shape)
        return adv if self.clip is None else adv.clamp(-self.clip, self.clip)


def policy_rollout(policy: Policy, adapter: Optional[str], batch: RolloutBatch, sigmas: Tensor,
                   kernel: KernelSpec) -> Trajectory:
    r"""A no-grad rollout of ``adapter`` for one batch: :math:`x_0\sim\mathcal N(0, I)` from the batch's
    generator, then :func:`~opd_ref.engine.trajectory.rollout` with ``policy.velocity(., ., batch.cond)``.

    .. math:: x_0\sim\mathcal N(0, I),\quad x_{n+1}\sim\pi_{adapter}(\cdot|x_n, c)

    Args:
        policy: a :class:`~opd_ref.engine.policy.Policy`.
        adapter: the adapter that samples (``None``: the reference).
        batch: the :class:`~opd_ref.engine.policy.RolloutBatch`.
        sigmas: the grid; kernel: the kernel.

    Returns:
        :class:`~opd_ref.engine.trajectory.Trajectory`.

    Reference: ``diffusionopd`` (student rollouts).
    """
    x0 = initial_noise(policy, batch)
    with torch.no_grad(), policy.active(adapter):
        return rollout(lambda x, s: policy.velocity(x, s, batch.cond), x0, sigmas, kernel, batch.generator)


def _task_rollout(policy: Policy, adapter: Optional[str], batch: RolloutBatch, spec: "UpdateSpec",
                  task: Optional[int]) -> Trajectory:
    """:func:`policy_rollout`; a :class:`NonFiniteError` it raises also names the task."""
    try:
        return policy_rollout(policy, adapter, batch, spec.sigmas, spec.kernel)
    except NonFiniteError as err:
        raise err.at(task=task) from None


def _velocity(policy: Policy, adapter: Optional[str], x: Tensor, sigma: float, cond: Any) -> Tensor:
    with torch.no_grad(), policy.active(adapter):
        return policy.velocity(x, sigma, cond)


def _check_loss(loss: Tensor, step: int, task: Optional[int]) -> None:
    if not bool(torch.isfinite(loss).all()):
        raise NonFiniteError("loss", step=step, task=task)


def optimizer_step(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float = 0.0, collective: Collective = LOCAL) -> float:
    r"""Sum gradients over processes, clip, step, zero; return the (pre-clip) global gradient norm.

    .. math:: g \leftarrow g\cdot\min\big(1, c/\|g\|\big),\qquad \theta \leftarrow \mathrm{opt}(\theta, g)

    A non-finite gradient raises :class:`~opd_ref.engine.trajectory.NonFiniteError` *before* the
    optimiser touches the parameters.

    Args:
        params: the trained parameters.
        optimizer: their optimiser.
        max_grad_norm: :math:`c` (0: no clipping).
        collective: :class:`~opd_ref.engine.policy.Collective`.

    Returns:
        the gradient norm.

    Reference: ``flowgrpo`` (gradient clipping), ``diffusionopd``.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    collective.sync_grads(params)
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    norm = float(norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError("gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def distill_update(
    policy: Policy,
    student: str,
    tasks: Sequence[DistillTask],
    spec: UpdateSpec,
    optimizer: torch.optim.Optimizer,
    *,
    collective: Collective = LOCAL,
    on_step: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, float]:
    r"""One on-policy distillation update over ``K`` tasks (round robin, gradients accumulated with
    weight :math:`1/K`, per-step backward), then one optimiser step.

    .. math::
        L(\theta) = \frac1K\sum_k \mathbb E_{x\sim\pi_\theta(\cdot|c_k)}\sum_{n\in\mathcal T}
            \ell_n\big(\pi_\theta(\cdot|x_n, c_k), \pi_{T_k}(\cdot|x_n, c_k)\big)

    Args:
        policy: the :class:`~opd_ref.engine.policy.Policy`.
        student: the student's adapter name.
        tasks: :class:`DistillTask` per task, in round-robin order.
        spec: :class:`UpdateSpec` (objective of family ``"distill"``).
        optimizer: the optimiser of ``policy.trainable_parameters(student)``.
        collective: sums gradients/statistics over processes.
        on_step: called after each trained step's backward with
            ``{"task", "step", "batch", "transition", "loss"}`` (tests recompute the loss from it).

    Returns:
        statistics: ``loss`` (task average), ``loss/NAME`` and ``div/NAME`` (the per-task objective and
        divergence summed over trained steps, averaged over samples), ``grad_norm``.

    Reference: ``diffusionopd`` (multi-task OPD, round robin), D13.
    """
    if spec.objective.objective.family != "distill":
        raise ValueError(f"distill_update needs a distillation objective, got {spec.objective.name!r}")
    if not tasks:
        raise ValueError("distill_update: tasks is empty")
    K = len(tasks)
    stats: Dict[str, float] = defaultdict(float)
    div_key = "match" if spec.objective.name == "opd_ode" else "kl"
    for k, task in enumerate(tasks):
        name = task.name or str(k)
        for batch in task.batches:
            traj = _task_rollout(policy, student, batch, spec, k)
            w = batch.weight / K
            for n in spec.trained_steps:
                tr = traj.transition(n)
                v_teacher = _velocity(policy, task.teacher, tr.x, tr.sigma, batch.cond)
                with policy.active(student):
                    v = policy.velocity(tr.x, tr.sigma, batch.cond)
                    out = spec.objective(StepInputs(tr.coef, v, tr.v_old, tr.noise, v_teacher))
                    _check_loss(out.loss, n, k)
                    (out.loss.mean() * w).backward()
                stats[f"loss/{name}"] += float(out.loss.detach().mean()) * batch.weight
                stats[f"div/{name}"] += float(out.stats[div_key].mean()) * batch.weight
                if on_step is not None:
                    on_step({"task": k, "step": n, "batch": batch, "transition": tr, "loss": out.loss.detach()})
    stats = collective.reduce(stats)
    stats["loss"] = sum(stats[f"loss/{t.name or k}"] for k, t in enumerate(tasks)) / K
    stats["grad_norm"] = optimizer_step(policy.trainable_parameters(student), optimizer, spec.max_grad_norm, collective)
    return dict(stats)


def _rewards(reward: Reward, traj: Trajectory, batch: RolloutBatch) -> Tensor:
    r = reward(traj.final, batch)
    r = torch.as_tensor(r).reshape(-1)
    if r.shape != (batch.size,) or not torch.is_floating_point(r) or not bool(torch.isfinite(r).all()):
        raise ValueError(f"reward must return ({batch.size},) finite floats, got shape {tuple(r.shape)}: {r[:4].tolist()}")
    return r.to(torch.float64)


def _group_rollouts(policy, adapter, groups, reward, spec, adv: AdvantageSpec, task: Optional[int] = None):
    out = []
    for group in groups:
        trajs = [_task_rollout(policy, adapter, b, spec, task) for b in group]
        r = torch.cat([_rewards(reward, t, b) for t, b in zip(trajs, group)])
        a = adv(r).split([b.size for b in group])
        out.append((group, trajs, r, a))
    return out


def grpo_update(
    policy: Policy,
    adapter: str,
    groups: Sequence[Sequence[RolloutBatch]],
    reward: Reward,
    spec: UpdateSpec,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int = 1,
    advantages: AdvantageSpec = AdvantageSpec(),
    collective: Collective = LOCAL,
) -> Dict[str, float]:
    r"""One Flow-GRPO update of ``adapter``: rollouts per group, group-normalised rewards, then
    ``epochs`` optimiser steps over the stored rollouts (per-step backward).

    .. math::
        \ell_n = -\min\big(r_n A, \mathrm{clip}(r_n, 1\pm\epsilon) A\big)
            + \beta\,\mathrm{KL}\big(\pi_\theta(\cdot|x_n)\|\pi_{ref}(\cdot|x_n)\big),\qquad
        A_i = \frac{R_i - \bar R_g}{\mathrm{std}(R_g) + \epsilon_A}

    Args:
        policy: the :class:`~opd_ref.engine.policy.Policy`.
        adapter: the adapter trained (a teacher in stage 1).
        groups: per group (e.g. one prompt), its rollout batches (same condition); batch weights sum
            to 1 over all groups on all processes.
        reward: ``reward(final_states (B, *event), batch) -> (B,)``.
        spec: :class:`UpdateSpec` with the ``grpo`` objective.
        optimizer: the optimiser of ``policy.trainable_parameters(adapter)``.
        epochs: optimiser steps over the same rollouts (the ratio departs from 1 after the first).
        advantages: :class:`AdvantageSpec`.
        collective: sums gradients/statistics over processes.

    Returns:
        statistics: ``reward``, ``loss``, ``kl_ref`` (summed over trained steps), ``ratio_mean``,
        ``ratio_max_dev``, ``clip_frac``, ``grad_norm`` (last epoch's loss/ratio statistics).

    Reference: ``flowgrpo``.
    """
    if spec.objective.objective.family != "rl":
        raise ValueError(f"grpo_update needs the 'grpo' objective, got {spec.objective.name!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    rolled = _group_rollouts(policy, adapter, groups, reward, spec, advantages)
    base: Dict[str, float] = {"reward": sum(float(r.mean()) * sum(b.weight for b in g) for g, _, r, _ in rolled)}
    n_t = len(spec.trained_steps)
    need_ref = spec.objective.kl_beta > 0
    params = policy.trainable_parameters(adapter)
    for _ in range(epochs):
        ep: Dict[str, float] = defaultdict(float)
        dev = torch.zeros(())
        for group, trajs, _r, adv in rolled:
            for batch, traj, a in zip(group, trajs, adv):
                a = a.to(traj.states.dtype)
                for n in spec.trained_steps:
                    tr = traj.transition(n)
                    v_ref = _velocity(policy, None, tr.x, tr.sigma, batch.cond) if need_ref else None
                    with policy.active(adapter):
                        v = policy.velocity(tr.x, tr.sigma, batch.cond)
                        out = spec.objective(StepInputs(tr.coef, v, tr.v_old, tr.noise, v_ref, a))
                        _check_loss(out.loss, n, None)
                        (out.loss.mean() * batch.weight).backward()
                    ep["loss"] += float(out.loss.detach().mean()) * batch.weight
                    ep["ratio_mean"] += float(out.stats["ratio"].mean()) * batch.weight / n_t
                    if "clipped" in out.stats:
                        ep["clip_frac"] += float(out.stats["clipped"].mean()) * batch.weight / n_t
                    if "kl_ref" in out.stats:
                        ep["kl_ref"] += float(out.stats["kl_ref"].mean()) * batch.weight
                    dev = torch.maximum(dev, (out.stats["ratio"] - 1).abs().max().cpu().to(dev.dtype))
        ep = collective.reduce(ep)
        ep["ratio_max_dev"] = float(dev)
        ep["grad_norm"] = optimizer_step(params, optimizer, spec.max_grad_norm, collective)
    stats = collective.reduce(base)
    stats.update(ep)
    return stats


def crd_update(
    policy: Policy,
    student: str,
    tasks: Sequence[Tuple[Sequence[Sequence[RolloutBatch]], Reward]],
    spec: UpdateSpec,
    optimizer: torch.optim.Optimizer,
    *,
    names: Sequence[str] = (),
    collective: Collective = LOCAL,
) -> Dict[str, float]:
    r"""One CRD update of the student on task rewards, round robin with weight :math:`1/K`.

    .. math::
        \hat r_i = \beta\sum_{n\in\mathcal T}\log\frac{\pi_\theta(x^{(i)}_{n+1}|x^{(i)}_n)}{\pi_{ref}(x^{(i)}_{n+1}|x^{(i)}_n)},
        \qquad \ell_i = \tfrac12\big[(\hat r_i - \bar{\hat r}_g) - (R_i - \bar R_g)\big]^2

    (:func:`opd_ref.crd.crd_loss`, D8), with CRD's mechanisms switched by ``spec.objective.crd``
    (:class:`~opd_ref.engine.crd_mechanisms.CRDMechanisms`, D17: the log-ratio's reference, the
    CFG-guided reference, the KL anchor :math:`+\beta_{KL}\,\omega_i\sum_n\mathrm{KL}(\pi_\theta\|\pi^w_{ref})`,
    reward-adaptive weights :math:`\omega_i`, the ELBO implicit reward).  Memory stays per step: for step :math:`n` the loss is
    evaluated on :math:`\hat r` whose value is the full sum at :math:`\theta_{old}` but whose gradient
    flows through step :math:`n` only; the sum over :math:`n` of these gradients is the gradient of
    the loss.

    Args:
        policy: the :class:`~opd_ref.engine.policy.Policy`.
        student: the adapter trained.
        tasks: per task, ``(groups, reward)``: each group a list of rollout batches of one condition
            (group weights = summed batch weights, 1 in all over the task's groups on all processes).
        spec: :class:`UpdateSpec` with the ``crd`` objective (``crd_beta``).
        optimizer: the optimiser of the student's parameters.
        names: task names for the statistics.
        collective: sums gradients/statistics over processes.

    Returns:
        statistics: ``loss``, ``reward/NAME``, ``implicit_reward_std/NAME``, ``grad_norm``; with the KL
        anchor also ``kl_anchor/NAME`` (summed per-step KL to the reference, sample mean) and
        ``kl_weight_mean/NAME`` (mean :math:`\omega_i`).

    Reference: ``crd``.
    """
    from opd_ref.crd import crd_loss, implicit_reward_from_steps
    from opd_ref.engine.crd_mechanisms import adaptive_kl_weights, elbo_levels, elbo_term, guided_condition

    if spec.objective.objective.family != "crd":
        raise ValueError(f"crd_update needs the 'crd' objective, got {spec.objective.name!r}")
    K = len(tasks)
    beta = spec.objective.crd_beta
    mech = spec.objective.crd
    coupled, elbo, anchor = mech.ratio_to == "sampler", mech.implicit == "elbo", mech.kl_beta > 0
    levels = elbo_levels(mech.elbo_levels) if elbo else ()
    stats: Dict[str, float] = defaultdict(float)
    for k, (groups, reward) in enumerate(tasks):
        name = names[k] if k < len(names) else str(k)
        for group, trajs, r, adv in _group_rollouts(policy, student, groups, reward, spec, AdvantageSpec(), k):
            gw = sum(b.weight for b in group)
            # pass 1 (no grad): per batch, its terms (trained steps, or ELBO levels) with the velocity they
            # are compared with (the possibly guided reference, or theta_old when coupled) and their value
            # at theta_old; the (guided) reference velocities at the trained steps for the KL anchor
            terms: List[list] = []
            v_refs: List[list] = []
            lr_rows = []
            for batch, traj in zip(group, trajs):
                ref_cond = guided_condition(policy, batch.cond, mech.guidance)
                need_ref = anchor or not (elbo or coupled)
                vr = [_velocity(policy, None, traj.transition(n).x, traj.transition(n).sigma, ref_cond) if need_ref
                      else None for n in spec.trained_steps]
                bt, vals = [], []
                if elbo:
                    x0 = traj.final
                    for s, wgt in levels:
                        eps = torch.randn(x0.shape, generator=batch.generator, dtype=x0.dtype, device=x0.device)
                        xs, u = (1.0 - s) * x0 + s * eps, eps - x0
                        v_old = _velocity(policy, student, xs, s, batch.cond)
                        v_a = v_old if coupled else _velocity(policy, None, xs, s, ref_cond)
                        bt.append((xs, s, v_a, u, wgt))
                        vals.append(elbo_term(v_old, v_a, u, wgt))
                else:
                    for j, n in enumerate(spec.trained_steps):
                        tr = traj.transition(n)
                        v_a = tr.v_old if coupled else vr[j]
                        bt.append((tr, v_a))
                        vals.append(spec.objective(StepInputs(tr.coef, tr.v_old, tr.v_old, tr.noise, v_a)).loss)
                terms.append(bt)
                v_refs.append(vr)
                lr_rows.append(torch.stack(vals, dim=1))
            step_lr = torch.cat(lr_rows).to(torch.float64)  # (G, |T|) or (G, J)
            ids = torch.zeros(step_lr.shape[0], dtype=torch.long, device=step_lr.device)
            r = r.to(step_lr.device)
            omega = (adaptive_kl_weights(torch.cat(adv).to(step_lr.device), mech.kl_floor, mech.adv_clip) if mech.adaptive_kl
                     else torch.ones_like(r))
            with torch.no_grad():
                r_hat = implicit_reward_from_steps(step_lr, beta)
                stats["loss"] += float(crd_loss(r_hat, r, ids).mean()) * gw / K
                stats[f"reward/{name}"] += float(r.mean()) * gw
                stats[f"implicit_reward_std/{name}"] += float(r_hat.std()) * gw
                if anchor:
                    stats[f"kl_weight_mean/{name}"] += float(omega.mean()) * gw

            def crd_part(rows: slice, j: int, lr_n: Tensor) -> Tensor:
                step_lr_n = step_lr.clone()
                step_lr_n[rows, j] = step_lr[rows, j] + (lr_n - lr_n.detach()).to(step_lr.dtype)
                return crd_loss(implicit_reward_from_steps(step_lr_n, beta), r, ids).mean() * (gw / K)

            def anchor_part(tr, v: Tensor, v_ref: Tensor, om: Tensor, batch: RolloutBatch) -> Tensor:
                kl = StepInputs(tr.coef, v, tr.v_old, tr.noise, v_ref).kl()
                stats[f"kl_anchor/{name}"] += float(kl.detach().mean()) * batch.weight
                return mech.kl_beta * (om.to(kl.dtype) * kl).mean() * (batch.weight / K)

            # pass 2: per term, gradient through that term only (plus, on rollout steps, the KL anchor)
            row = 0
            for c, (batch, traj) in enumerate(zip(group, trajs)):
                rows = slice(row, row + batch.size)
                row += batch.size
                for j, term in enumerate(terms[c]):
                    with policy.active(student):
                        if elbo:
                            xs, s, v_a, u, wgt = term
                            lr_n = elbo_term(policy.velocity(xs, s, batch.cond), v_a, u, wgt)
                            _check_loss(lr_n, j, k)
                            crd_part(rows, j, lr_n).backward()
                            continue
                        tr, v_a = term
                        v = policy.velocity(tr.x, tr.sigma, batch.cond)
                        lr_n = spec.objective(StepInputs(tr.coef, v, tr.v_old, tr.noise, v_a)).loss
                        _check_loss(lr_n, tr.index, k)
                        loss = crd_part(rows, j, lr_n)
                        if anchor:
                            loss = loss + anchor_part(tr, v, v_refs[c][j], omega[rows], batch)
                        loss.backward()
                if elbo and anchor:
                    for j, n in enumerate(spec.trained_steps):
                        tr = traj.transition(n)
                        with policy.active(student):
                            v = policy.velocity(tr.x, tr.sigma, batch.cond)
                            anchor_part(tr, v, v_refs[c][j], omega[rows], batch).backward()
    stats = collective.reduce(stats)
    stats["grad_norm"] = optimizer_step(policy.trainable_parameters(student), optimizer, spec.max_grad_norm, collective)
    return dict(stats)


@torch.no_grad()
def path_divergence(policy: Policy, student: str, tasks: Sequence[DistillTask], sigmas: Tensor,
                    kernel: KernelSpec, *, collective: Collective = LOCAL) -> Dict[str, float]:
    r"""Per task, the student-teacher path divergence along student rollouts (chain rule, D3):

    .. math::
        \mathrm{KL}(P_\theta\|P_{T_k}) = \mathbb E_{x\sim\pi_\theta}\sum_{n: s_n>0}
            \frac{\|c_v^{(n)}(v_\theta - v_{T_k})(x_n)\|^2}{2 s_n^2}

    over the steps that have a density (for the ODE: the summed matching loss
    :math:`\tfrac12\|x'_\theta - x'_T\|^2` of every step instead).

    Args:
        policy, student: the policy and the student's adapter.
        tasks: :class:`DistillTask` per task (fixed generators give common random numbers).
        sigmas, kernel: the grid and kernel.
        collective: sums over processes.

    Returns:
        ``{NAME: divergence}`` per task (sample average with the batches' weights).

    Reference: ``diffusionopd``, D3.
    """
    levels = kernel.check_grid(sigmas)
    coefs = [kernel.coefficients(s, sn) for s, sn in zip(levels, levels[1:])]
    ode = kernel.kind == "ode"
    out: Dict[str, float] = defaultdict(float)
    for k, task in enumerate(tasks):
        name = task.name or str(k)
        for batch in task.batches:
            traj = policy_rollout(policy, student, batch, sigmas, kernel)
            for n, c in enumerate(coefs):
                if not (c.stochastic or ode):
                    continue
                x = traj.states[n]
                gap = c.c_v * (traj.velocities[n] - _velocity(policy, task.teacher, x, c.sigma, batch.cond))
                sq = gap.flatten(1).pow(2).sum(1)
                div = 0.5 * sq if ode else sq / (2.0 * c.std**2)
                out[name] += float(div.mean()) * batch.weight
    return collective.reduce(out)
