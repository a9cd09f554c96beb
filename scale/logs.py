"""Console output of the ``opd-scale`` commands: library notes silenced or shown once, no nested
progress bars when stderr is not a terminal.

* transformers' "``CLIPImageProcessor`` requires torchvision (not installed); falling back to ..."
  notes (logger ``transformers.utils.import_utils``) are silenced: the SD3 pipeline loads no image
  processor that is used, so they say nothing about a run.
* every other warning of diffusers and transformers is printed once per distinct text before its
  first colon: the CLIP "The following part of your input was truncated ..." warning, which diffusers
  logs on every prompt encoding (``opd-scale bench`` encodes ten times), appears once.
* when stderr is not a terminal (a redirected log), the progress bars of diffusers, transformers and
  huggingface_hub are disabled: nested bars ("Loading pipeline components" around "Loading weights")
  write cursor-up codes (``ESC[A``) into files.  ``opd-scale``'s own bars keep one bar at a time.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, TextIO

__all__ = ["configure_output", "OncePerText"]

#: loggers whose warnings are silenced (see the module docstring)
SILENCED = ("transformers.utils.import_utils",)


class OncePerText(logging.Filter):
    """Pass the first record of each (logger, text before the first colon) and drop its repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage().split(":", 1)[0])
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure_output(stream: Optional[TextIO] = None) -> None:
    """Apply the rules of the module docstring (idempotent).  ``stream``: where the libraries' bars
    and warnings go (default ``sys.stderr``); its ``isatty()`` decides about progress bars.

    Imports diffusers and transformers (their logging modules install the handlers that are filtered
    here), so it raises ``ModuleNotFoundError`` without the scale extra."""
    stream = sys.stderr if stream is None else stream
    for name in SILENCED:
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        root = lib.get_logger()  # the library's root logger; creating it installs its stderr handler
        for handler in root.handlers:
            if not any(isinstance(f, OncePerText) for f in handler.filters):
                handler.addFilter(OncePerText())
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        from huggingface_hub.utils import disable_progress_bars

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
