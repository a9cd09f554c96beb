"""An adapter file that fails at import (opd-check must report it, exit 2, no traceback)."""

raise RuntimeError("this file cannot be imported")
