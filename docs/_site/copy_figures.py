"""Copy the figures of an ``opd-toys reproduce`` run into ``docs/figures/`` for the site.

Usage::

    opd-toys reproduce --out runs/reproduce
    python docs/_site/copy_figures.py runs/reproduce

Each ``RUN/figures/*.png`` is re-saved with a 256-colour palette (about 3x smaller, no visible change
for line plots and heat maps) when Pillow is installed, and copied as is otherwise.  Figures in
``docs/figures/`` that the run did not produce are left alone.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS_FIGURES = Path(__file__).resolve().parents[1] / "figures"


def copy_figures(run_dir: Path, dest: Path = DOCS_FIGURES) -> list:
    """Copy (and palette-compress) ``run_dir/figures/*.png`` into ``dest``; return the names."""
    src = Path(run_dir) / "figures"
    pngs = sorted(src.glob("*.png"))
    if not pngs:
        raise SystemExit(f"copy_figures: no PNG in {src} (run `opd-toys reproduce --out {run_dir}` first)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image
    except ImportError:  # plain copy without Pillow
        Image = None
    for png in pngs:
        if Image is None:
            shutil.copyfile(png, dest / png.name)
        else:
            with Image.open(png) as im:
                im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(dest / png.name, optimize=True)
    return [p.name for p in pngs]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python docs/_site/copy_figures.py RUN_DIR")
    names = copy_figures(Path(sys.argv[1]))
    print(f"copied {len(names)} figures to {DOCS_FIGURES}: {', '.join(names)}")
