"""The lowest releases of the scale extra's libraries that the suite works with, checked at run time.

Older releases import and mostly run but fail in ways that are hard to read: diffusers 0.35-0.39 load
the pipeline, then ``load_lora_weights(DIR)`` asks for ``weight_name`` when offline; transformers 4.57
cannot build the tiny pipeline's tokenizers.  :func:`check_versions` turns that into one clear error
before anything is loaded.  The floors are the ones in ``pyproject.toml``'s ``scale`` extra (a test
keeps the two equal; the comments there say how each floor was found).
"""

from __future__ import annotations

import importlib.metadata
from typing import Dict, Optional

__all__ = ["MIN_VERSIONS", "DependencyVersionError", "check_versions"]

#: package -> lowest supported release (the ``>=`` floors of pyproject's ``scale`` extra)
MIN_VERSIONS: Dict[str, str] = {"diffusers": "0.40", "transformers": "5.13"}


class DependencyVersionError(RuntimeError):
    """An installed library of the ``scale`` extra is older than :data:`MIN_VERSIONS` allows."""


def check_versions(installed: Optional[Dict[str, str]] = None) -> None:
    """Raise :class:`DependencyVersionError` naming the package, its version and the floor when an
    installed library is too old (a package that is not installed is left to the import that needs it).

    Args:
        installed: ``{package: version}`` to check instead of what is installed (for tests).
    """
    found = {}
    for name in MIN_VERSIONS:
        if installed is not None:
            have = installed.get(name)
        else:
            try:
                have = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                have = None
        if have is not None:
            found[name] = have
    if not found:
        return
    from packaging.version import Version  # a dependency of diffusers and transformers

    for name, have in found.items():
        floor = MIN_VERSIONS[name]
        if Version(have) < Version(floor):
            raise DependencyVersionError(
                f"{name} {have} is older than the {floor} this suite needs; upgrade with "
                f"pip install -U '{name}>={floor}' (or reinstall the scale extra: pip install -e '.[scale]')")
