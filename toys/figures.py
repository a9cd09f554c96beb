"""Matplotlib helpers (Agg backend) shared by the toy experiments: colours, bands, density panels.

Every figure is written as a PNG with labelled axes (units in brackets; ``nats`` for KL, ``a.u.``
for squared-gradient norms in parameter units).
"""

from __future__ import annotations

import pathlib
from typing import Callable, Dict, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["COLORS", "LABELS", "plt", "save", "band", "density_grid", "plot_density"]

COLORS: Dict[str, str] = {
    "pathwise": "tab:blue", "opd_kl": "tab:blue", "opd_ode": "tab:cyan", "ppo": "tab:orange",
    "ppo_opd": "tab:orange",
    "k1": "tab:red", "vopd": "tab:green", "grpo": "tab:purple", "cascade": "tab:brown",
    "opd": "tab:blue", "joint": "tab:purple", "opd_rl_teachers": "tab:gray",
}
LABELS: Dict[str, str] = {
    "pathwise": "pathwise (closed-form KL)", "opd_kl": "DiffusionOPD-KL (SDE)", "opd_ode": "DiffusionOPD-ODE (matching)",
    "ppo": "PPO-OPD", "ppo_opd": "PPO-OPD", "k1": "k1", "vopd": "vOPD", "grpo": "GRPO (+KL to ref)", "opd": "multi-task OPD",
    "joint": "joint multi-reward GRPO", "cascade": "cascade GRPO", "opd_rl_teachers": "OPD, RL-trained teachers",
}


def save(fig, out_dir: pathlib.Path, name: str, rect=None) -> str:
    """Save ``fig`` as ``out_dir/name`` (PNG, 110 dpi), close it, return the file name.  ``rect``: the
    ``(left, bottom, right, top)`` figure fraction the panels are laid out in (room for a figure legend)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def band(ax, x, ys: np.ndarray, key: str, label: str | None = None) -> None:
    """Mean line with a +-1 std band over seeds; ``ys`` is ``(n_seeds, len(x))``."""
    ys = np.asarray(ys, dtype=float)
    m, s = ys.mean(0), ys.std(0)
    c = COLORS.get(key)
    ax.plot(x, m, color=c, label=label or LABELS.get(key, key), lw=1.8)
    if ys.shape[0] > 1:
        ax.fill_between(x, m - s, m + s, color=c, alpha=0.2, lw=0)


def density_grid(half_width: float = 4.0, n: int = 120):
    """Grid points ``(n*n, 2)`` float64 and the two axes' ticks for density images."""
    t = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    gx, gy = torch.meshgrid(t, t, indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), t.numpy()


def plot_density(ax, log_prob: Callable | None, title: str, *, samples: torch.Tensor | None = None,
                 half_width: float = 4.0, n: int = 120) -> None:
    """Image of an exact density (``log_prob``) or a 2D histogram of ``samples``, axes in data units."""
    if log_prob is not None:
        pts, t = density_grid(half_width, n)
        with torch.no_grad():
            img = torch.exp(log_prob(pts)).reshape(n, n).numpy()
        ax.imshow(img, origin="lower", extent=(t[0], t[-1], t[0], t[-1]), cmap="viridis", aspect="equal")
    else:
        xy = samples.detach().numpy()
        ax.hist2d(xy[:, 0], xy[:, 1], bins=60, range=[[-half_width, half_width]] * 2, cmap="viridis")
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("$x_1$", fontsize=7)
    ax.set_ylabel("$x_2$", fontsize=7)
    ax.tick_params(labelsize=6)


def legend_outside(ax, **kw) -> None:
    ax.legend(fontsize=7, **kw)


def seeds_array(rows: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=float)
