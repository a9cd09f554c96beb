"""toys: exact 2D Gaussian-mixture flows, the ground truth on which every derivation is checked.

``toys.gmm`` (densities, marginals, velocities, scores, denoisers, reward tilts), ``toys.rewards``
(concave quadratic rewards), ``toys.students`` and ``toys.policy`` (the students as an ``opd_ref.engine``
policy: the toys train through the engine that trains SD3.5).
Submodules are imported explicitly (``from toys.gmm import GaussianMixture``).
"""
