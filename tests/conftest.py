"""Shared test configuration: hypothesis profiles (the `ci` profile is loaded when CI is set) and
one intra-op thread per process.

The suite's tensors are tiny: on a 2-core machine one torch thread is several times faster than two
(thread hand-off dominates), and it leaves the second core to a second pytest worker or to the
second process of the DDP test.  Set before torch is imported so subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow],
)
# derandomize=False explicitly: hypothesis's own CI detection tests for the *presence* of CI (so
# `CI= pytest --hypothesis-seed N` would otherwise inherit its derandomised ci profile and ignore N)
settings.register_profile("dev", deadline=None, max_examples=60, derandomize=False)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
