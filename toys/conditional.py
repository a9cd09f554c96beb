r"""A conditional toy with classifier-free guidance and a reward that can be hacked (derivation D17).

**Class-conditional flows.**  Classes :math:`c = 0..C-1` with prior :math:`\pi_c` and exact
conditional laws :math:`p(x|c)` (2D Gaussian mixtures); the unconditional law is the mixture
:math:`p(x) = \sum_c \pi_c\,p(x|c)` (again a Gaussian mixture, with weights :math:`\pi_c w_{ck}`).
Their exact flow velocities :math:`v_c = v_{p(\cdot|c)}`, :math:`v_u = v_{p}` come from
:meth:`toys.gmm.GaussianMixture.velocity`; classifier-free guidance (CFG) with scale :math:`w` uses

.. math::
    v^{w}_c(x,\sigma) = v_u(x,\sigma) + w\,\big(v_c(x,\sigma) - v_u(x,\sigma)\big),

which, the velocity being affine in the score, is the velocity whose score is
:math:`w\nabla\log p_\sigma(x|c) + (1-w)\nabla\log p_\sigma(x)` — the score of the *noised* tilted
product at every :math:`\sigma`, not the flow of the tilted product
:math:`p_w(x|c) \propto p(x|c)^w p(x)^{1-w}` of the data (noising does not commute with powers), so
the guided sampler's final law is neither :math:`p(x|c)` nor :math:`p_w(x|c)` in general;
:func:`guided_sampler_law` measures how far it is from both.

**Kernels.**  One step of the guided sampler is the public kernel (D2) evaluated at the guided
velocity, :func:`guided_kernel`; a student kernel and the guided reference kernel at the same state
share their std, so their KL is the closed form :math:`\|\mu_s - \mu_w\|^2/(2 s^2)` (D1,
:func:`kernel_kl`).

**A hackable reward.**  :class:`HackableReward`: the proxy :math:`r_{proxy}(x) = \alpha\,b^\top x`
keeps growing in the direction :math:`b`; the true reward
:math:`r_{true}(x) = \alpha\,b^\top x - \lambda\,\mathrm{relu}(b^\top x - m)^2` equals it wherever
:math:`b^\top x \le m` (``m`` is placed at a high quantile of the data) and falls off beyond.

Reference: ``crd`` (CFG-guided reference, reward hacking); Ho & Salimans (2022) (classifier-free guidance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from opd_ref import GaussianStep, same_cov_kl, sde_step
from toys.gmm import GaussianMixture
from toys.metrics import quadrature_grid
from toys.policy import ToyPolicy
from toys.students import GMMStudent

__all__ = ["ConditionalGMM", "Guided", "guided_kernel", "kernel_kl", "guided_sampler_law", "HackableReward",
           "ConditionalToyPolicy", "conditional_student", "default_conditional", "tilted_log_density"]


class ConditionalGMM:
    r"""Class-conditional Gaussian-mixture flows :math:`p(x|c)` and their mixture :math:`p(x)`.

    .. math:: p(x) = \sum_c \pi_c\,p(x|c),\qquad v^w_c = v_u + w\,(v_c - v_u)

    Args:
        conditionals: per class, its mixture :math:`p(\cdot|c)` (same dimension).
        class_weights: ``(C,)`` prior :math:`\pi_c` (positive, sums to 1).

    Reference: Ho & Salimans (2022); ``crd``.
    """

    def __init__(self, conditionals: Sequence[GaussianMixture], class_weights: Tensor) -> None:
        if len(conditionals) < 2 or not all(isinstance(m, GaussianMixture) for m in conditionals):
            raise TypeError(f"conditionals must be >= 2 GaussianMixture, got {[type(m).__name__ for m in conditionals]}")
        pi = torch.as_tensor(class_weights, dtype=conditionals[0].dtype)
        if pi.shape != (len(conditionals),) or not bool((pi > 0).all()) or abs(float(pi.sum()) - 1) > 1e-12:
            raise ValueError(f"class_weights must be ({len(conditionals)},) positive summing to 1, got {pi.tolist()}")
        self.conditionals = list(conditionals)
        self.class_weights = pi
        self.unconditional = GaussianMixture(
            torch.cat([p * m.weights for p, m in zip(pi, conditionals)]),
            torch.cat([m.means for m in conditionals]), torch.cat([m.covs for m in conditionals]))

    @property
    def n_classes(self) -> int:
        return len(self.conditionals)

    def law(self, c: Optional[int]) -> GaussianMixture:
        """:math:`p(\\cdot|c)`, or :math:`p` for ``c = None``."""
        if c is None:
            return self.unconditional
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.n_classes:
            raise ValueError(f"class c must be an int in [0, {self.n_classes}) or None, got {c!r}")
        return self.conditionals[c]

    def velocity(self, x: Tensor, sigma: float, c: Optional[int]) -> Tensor:
        r"""Exact flow velocity :math:`v_c(x,\sigma)` (``c = None``: :math:`v_u`), ``(B, d)``."""
        return self.law(c).velocity(x, sigma)

    def guided_velocity(self, x: Tensor, sigma: float, c: int, w: float) -> Tensor:
        r"""CFG velocity :math:`v_u + w\,(v_c - v_u)`, ``(B, d)``.

        .. math:: v^w_c(x,\sigma) = v_u(x,\sigma) + w\,\big(v_c(x,\sigma) - v_u(x,\sigma)\big)
        """
        v_u = self.unconditional.velocity(x, sigma)
        return v_u + float(w) * (self.law(int(c)).velocity(x, sigma) - v_u)

    def tilted_product_log_density(self, x: Tensor, c: int, w: float) -> Tensor:
        r"""Unnormalised :math:`\log\big(p(x|c)^w p(x)^{1-w}\big)`, ``(B,)``.

        .. math:: \log \tilde p_w(x|c) = w\log p(x|c) + (1-w)\log p(x)
        """
        return w * self.law(int(c)).log_prob(x) + (1.0 - w) * self.unconditional.log_prob(x)


def tilted_log_density(log_density: Callable[[Tensor], Tensor], *, center: Tensor, half_width: float,
                       n: int) -> Callable[[Tensor], Tensor]:
    r"""Normalise an unnormalised 2D log-density by quadrature on the square ``center + [-h, h]^2``.

    .. math:: \log q(x) = \log\tilde q(x) - \log\textstyle\sum_i h^2\,\tilde q(x_i)

    Returns:
        ``log q: (M, 2) -> (M,)``.
    """
    pts, area = quadrature_grid(center, half_width, n)
    with torch.no_grad():
        log_z = float(torch.logsumexp(log_density(pts), 0)) + math.log(area)
    return lambda x: log_density(x) - log_z


@dataclass(frozen=True)
class Guided:
    """A condition meaning "class ``c`` under CFG scale ``w``" (what :meth:`ConditionalToyPolicy.with_guidance` returns)."""

    c: int
    w: float


def guided_kernel(model: ConditionalGMM, x: Tensor, sigma: float, sigma_next: float, c: int, w: float,
                  noise_level: float) -> GaussianStep:
    r"""One SDE step of the guided sampler: the public kernel (D2) at :math:`v^w_c`.

    .. math::
        \mu = x + \Delta t\Big[v^w_c + \frac{s_t^2}{2\sigma}\big(x + (1-\sigma)v^w_c\big)\Big],\qquad
        s = s_t\sqrt{-\Delta t}

    Args:
        model: the conditional flows; x: ``(B, 2)``; sigma, sigma_next: the step;
        c: class; w: CFG scale; noise_level: :math:`a > 0`.

    Returns:
        :class:`opd_ref.GaussianStep` (``sigma = 1`` uses Flow-GRPO's rule).

    Reference: ``flowgrpo`` (SDE kernel), ``crd``.
    """
    return sde_step(x, model.guided_velocity(x, sigma, c, w), sigma, sigma_next, noise_level, sigma_one="flowgrpo")


def kernel_kl(student: GaussianStep, reference: GaussianStep) -> Tensor:
    r"""Closed-form KL between a student kernel and the (guided) reference kernel at the same state.

    .. math:: \mathrm{KL}\big(\mathcal N(\mu_s, s^2 I)\,\|\,\mathcal N(\mu_w, s^2 I)\big) = \frac{\|\mu_s - \mu_w\|^2}{2s^2}

    Args:
        student, reference: :class:`opd_ref.GaussianStep` with the same std.

    Returns:
        ``(B,)``.

    Reference: ``diffusionopd`` (D1); ``crd``.
    """
    if not torch.equal(torch.as_tensor(student.std), torch.as_tensor(reference.std)):
        raise ValueError("student and reference kernels must share their std (same state and step)")
    return same_cov_kl(student.mean, reference.mean, student.std)


def guided_sampler_law(model: ConditionalGMM, c: int, w: float, *, half_width: float, n: int,
                       ode_steps: int) -> dict:
    r"""How far the guided ODE sampler's final law :math:`q_w` is from :math:`p(x|c)` and from
    :math:`p_w(x|c) \propto p(x|c)^w p(x)^{1-w}`.

    .. math::
        \log q_w(x) = \log\mathcal N(x_1; 0, I) + \int_0^1 \nabla\cdot v^w_c(x_\sigma,\sigma)\,d\sigma

    (exact ODE likelihood, :func:`opd_ref.elbo.ode_log_likelihood`, RK4 with ``ode_steps`` steps),
    then both reverse KLs by quadrature on an ``n x n`` grid of ``[-h, h]^2``.

    Returns:
        ``{"kl_to_conditional", "kl_to_tilted_product", "mass", "log_q"}`` (``log_q``: the grid values).

    Reference: ``crd``; Ho & Salimans (2022).
    """
    from opd_ref.elbo import ode_log_likelihood

    center = torch.zeros(2, dtype=torch.float64)
    pts, area = quadrature_grid(center, half_width, n)
    log_q = torch.cat([ode_log_likelihood(lambda x, s: model.guided_velocity(x, s, c, w), chunk, n_steps=ode_steps)
                       for chunk in pts.split(4096)]).detach()
    prod = tilted_log_density(lambda x: model.tilted_product_log_density(x, c, w), center=center,
                              half_width=half_width, n=n)
    q = log_q.exp()
    with torch.no_grad():
        kl_c = float(area * (q * (log_q - model.law(c).log_prob(pts))).sum())
        kl_p = float(area * (q * (log_q - prod(pts))).sum())
    return {"kl_to_conditional": kl_c, "kl_to_tilted_product": kl_p, "mass": float(area * q.sum()), "log_q": log_q}


class HackableReward:
    r"""A proxy reward that agrees with the true reward on the data's support and keeps growing off it.

    .. math::
        r_{proxy}(x) = \alpha\,b^\top x,\qquad
        r_{true}(x) = \alpha\,b^\top x - \lambda\,\mathrm{relu}(b^\top x - m)^2

    Args:
        direction: ``(d,)`` unit direction :math:`b`.
        scale: :math:`\alpha > 0`; threshold: :math:`m`; penalty: :math:`\lambda > 0`.

    Reference: ``crd`` (reward hacking, "loopholes").
    """

    def __init__(self, direction: Tensor, scale: float, threshold: float, penalty: float) -> None:
        b = torch.as_tensor(direction, dtype=torch.float64)
        if b.dim() != 1 or not abs(float(b.norm()) - 1.0) < 1e-9:
            raise ValueError(f"direction must be a unit (d,) vector, got {b.tolist()}")
        if not scale > 0 or not penalty > 0 or not math.isfinite(threshold):
            raise ValueError(f"scale and penalty must be > 0 and threshold finite, got {scale}, {penalty}, {threshold}")
        self.direction, self.scale, self.threshold, self.penalty = b, float(scale), float(threshold), float(penalty)

    def proxy(self, x: Tensor) -> Tensor:
        """``(B,)`` :math:`r_{proxy}(x)`."""
        return self.scale * (x @ self.direction.to(x.dtype))

    def true(self, x: Tensor) -> Tensor:
        """``(B,)`` :math:`r_{true}(x)`."""
        proj = x @ self.direction.to(x.dtype)
        return self.scale * proj - self.penalty * torch.relu(proj - self.threshold) ** 2

    def linear_part(self):
        """The proxy as a :class:`toys.rewards.QuadraticFormReward` (closed-form tilts, D7)."""
        from toys.rewards import LinearReward

        return LinearReward(self.scale * self.direction)


class ConditionalToyPolicy(ToyPolicy):
    r"""The engine's policy for the conditional toy: a per-class student, the exact conditional
    reference, and the CFG-guided reference through :meth:`with_guidance`.

    .. math::
        v_{None}(x,\sigma,c) = v_c(x,\sigma),\qquad v_{None}(x,\sigma,\mathrm{Guided}(c,w)) = v_u + w(v_c - v_u)

    Args:
        student: a per-class student (``velocity(x, sigma, c)``; e.g. :func:`conditional_student`).
        model: the :class:`ConditionalGMM` (the frozen reference).

    Reference: ``crd``; ``diffusionopd`` (adapters on a frozen base).
    """

    def __init__(self, student, model: ConditionalGMM) -> None:
        super().__init__(student, [], None)
        self.model = model
        self._fns[None] = self._conditional_reference

    def _conditional_reference(self, x: Tensor, sigma: float, cond: object) -> Tensor:
        if isinstance(cond, Guided):
            return self.model.guided_velocity(x, sigma, cond.c, cond.w)
        return self.model.velocity(x, sigma, int(cond))

    def with_guidance(self, cond: object, w: float) -> Guided:
        """The condition under which the reference's velocity is the CFG velocity of class ``cond``."""
        return Guided(int(cond), float(w))


def conditional_student(model: ConditionalGMM) -> GMMStudent:
    r"""A per-class GMM student initialised at :math:`p(\cdot|c)` for every class (same component count).

    .. math:: p_{\theta, c} = p(\cdot|c)\ \text{at initialisation}

    Reference: ``diffusionopd`` (student initialised at the reference).
    """
    ks = {m.n_components for m in model.conditionals}
    if len(ks) != 1:
        raise ValueError(f"every class needs the same number of components, got {sorted(ks)}")
    student = GMMStudent(model.conditionals[0], n_tasks=model.n_classes)
    with torch.no_grad():
        for c, m in enumerate(model.conditionals[1:], start=1):
            one = GMMStudent(m, n_tasks=1)
            student.logits[c].copy_(one.logits[0])
            student.means[c].copy_(one.means[0])
            student.chol_raw[c].copy_(one.chol_raw[0])
    return student


def default_conditional() -> Tuple[ConditionalGMM, HackableReward]:
    r"""Two classes of two modes each, overlapping near the origin; the proxy rewards height
    :math:`x_2`, the true reward stops paying above :math:`m = 1.6` (about the 97th percentile of
    :math:`x_2` under each class)."""
    dt = torch.float64
    eye = torch.eye(2, dtype=dt)
    c0 = GaussianMixture(torch.tensor([0.6, 0.4], dtype=dt), torch.tensor([[-1.5, 0.8], [-0.3, -0.9]], dtype=dt),
                         torch.stack([0.25 * eye, torch.diag(torch.tensor([0.35, 0.2], dtype=dt))]))
    c1 = GaussianMixture(torch.tensor([0.5, 0.5], dtype=dt), torch.tensor([[1.5, 0.8], [0.3, -0.9]], dtype=dt),
                         torch.stack([torch.diag(torch.tensor([0.2, 0.3], dtype=dt)), 0.25 * eye]))
    model = ConditionalGMM([c0, c1], torch.tensor([0.5, 0.5], dtype=dt))
    reward = HackableReward(torch.tensor([0.0, 1.0], dtype=dt), scale=1.0, threshold=1.6, penalty=3.0)
    return model, reward
