"""Which optional extra of ``opd-ref`` provides a missing module, and the message the CLIs print.

The extras are declared in ``pyproject.toml`` (``[project.optional-dependencies]``); :data:`EXTRA_MODULES`
lists the *import* names of each extra's packages (``pillow`` imports as ``PIL``).  A test checks that
it covers every package that ``pyproject.toml`` declares.  ``opd-toys`` and ``opd-scale`` turn a
``ModuleNotFoundError`` of one of these modules into :func:`missing_extra_message` on stderr and exit 2,
without a traceback.
"""

from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

__all__ = ["EXTRA_MODULES", "missing_extra", "missing_extra_message", "report_missing_extra"]

#: extra -> import names of the packages it installs (pyproject.toml's optional dependencies)
EXTRA_MODULES: Dict[str, Tuple[str, ...]] = {
    "toys": ("matplotlib", "tqdm"),
    "scale": ("diffusers", "peft", "transformers", "accelerate", "safetensors", "sentencepiece", "tokenizers",
              "PIL", "tqdm"),
    "docs": ("mkdocs", "material", "mkdocstrings"),
}


def _missing_module(err: BaseException) -> Optional[str]:
    """The top-level name of the first module that ``err`` or its causes could not import (diffusers'
    lazy imports wrap a ``ModuleNotFoundError`` of transformers / peft in a ``RuntimeError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            return err.name.partition(".")[0]
        err = err.__cause__ or err.__context__
    return None


def missing_extra(err: BaseException, prefer: str) -> Optional[str]:
    """The extra that provides the module ``err`` (or an exception it was raised from) could not
    import, ``prefer`` first when several do (``tqdm``); ``None`` when no optional dependency is
    missing (then the error is a real bug and should propagate)."""
    if prefer not in EXTRA_MODULES:
        raise ValueError(f"prefer must be one of {tuple(EXTRA_MODULES)}, got {prefer!r}")
    top = _missing_module(err)
    for extra in (prefer, *EXTRA_MODULES):
        if top in EXTRA_MODULES[extra]:
            return extra
    return None


def missing_extra_message(err: BaseException, prefer: str) -> Optional[str]:
    """``"the optional dependency 'diffusers' is not installed; ... install with pip install -e
    '.[scale]' ..."`` for ``err``, or ``None`` when no optional dependency is missing."""
    extra = missing_extra(err, prefer)
    if extra is None:
        return None
    top = _missing_module(err)
    return (f"the optional dependency {top!r} is not installed; it comes with the {extra!r} extra: "
            f"install with pip install -e '.[{extra}]' from the repository root "
            f"(or pip install 'opd-ref[{extra}]')")


def report_missing_extra(err: BaseException, prefer: str, prog: str) -> bool:
    """Print ``PROG: error: <missing_extra_message>`` on stderr and return ``True`` when ``err`` is a
    missing optional dependency; ``False`` (nothing printed: the caller re-raises) otherwise."""
    message = missing_extra_message(err, prefer)
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return message is not None
