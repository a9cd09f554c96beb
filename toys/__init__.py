"""toys: exact 2D Gaussian-mixture flows, the ground truth on which every derivation is checked.

``toys.gmm`` (densities, marginals, velocities, scores, denoisers, reward tilts), ``toys.rewards``
(concave quadratic rewards), ``toys.samplers`` (ODE / SDE / CPS rollouts built on ``opd_ref.kernels``).
Submodules are imported explicitly (``from toys.gmm import GaussianMixture``).
"""
