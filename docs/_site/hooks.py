"""MkDocs hooks of the site: link each page's ``## Code`` names, show its ``## Figure``.

**Code.** In a ``## Code`` section, a dotted name of a public ``opd_ref`` object written as inline
code (```opd_ref.kernels.sde_step```) becomes a link to its entry in the API reference (names that do
not resolve to a documented object stay plain code, so the build never breaks on them; the docs test
checks separately that they resolve).

**Figures page.** ``figures/index.md`` gets one section per PNG in ``docs/figures/``.

**Figure.**
Derivation pages (and any other page) name the PNG that ``opd-toys reproduce`` writes, by filename,
in a ``## Figure`` section.  The site keeps copies of those PNGs in ``docs/figures/`` (refresh them
with the command in ``docs/index.md``).  For every ``*.png`` filename mentioned in that section and
not already embedded as an image, this hook appends the image when ``docs/figures/<name>`` exists,
and otherwise a one-line note saying which command produces it, so a strict build never depends on
a figure having been generated.
"""

from __future__ import annotations

import importlib
import inspect
import posixpath
import re
import sys
from pathlib import Path

_SECTION = re.compile(r"^## Figure[^\n]*\n(.*?)(?=^#{1,2} |\Z)", re.S | re.M)
_PNG = re.compile(r"(?<![\w./-])(?:[\w.-]*/)*([\w.-]+\.png)")


_CODE_SECTION = re.compile(r"^## Code[^\n]*\n(.*?)(?=^#{1,2} |\Z)", re.S | re.M)
_DOTTED = re.compile(r"(?<!\[)`(opd_ref(?:\.[A-Za-z_]\w*)+)(?:\(\))?`")


def resolve_dotted(dotted: str):
    """The object a dotted name (``pkg.module.attr...``) names, or None if it does not exist."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def documented_target(dotted: str, files) -> str | None:
    """Identifier of the API-reference entry that ``dotted`` names, or None if there is none."""
    obj = resolve_dotted(dotted)
    if obj is None:
        return None
    if inspect.ismodule(obj):
        page = "index" if obj.__name__ == "opd_ref" else obj.__name__.rsplit(".", 1)[-1]
        return obj.__name__ if files.get_file_from_path(f"api/{page}.md") else None
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return None
    module, qualname = obj.__module__, obj.__qualname__
    if not module.startswith("opd_ref") or "<" in qualname:
        return None
    if qualname.split(".")[0] not in getattr(sys.modules[module], "__all__", ()):
        return None
    if "." in qualname and not inspect.getdoc(obj):
        return None  # an undocumented method is not rendered
    if files.get_file_from_path(f"api/{module.rsplit('.', 1)[-1]}.md") is None:
        return None
    return f"{module}.{qualname}"


def _link_code_names(markdown: str, files) -> str:
    match = _CODE_SECTION.search(markdown)
    if not match:
        return markdown

    def link(m: re.Match) -> str:
        target = documented_target(m.group(1), files)
        return f"[{m.group(0)}][{target}]" if target else m.group(0)

    section = _DOTTED.sub(link, match.group(1))
    return markdown[: match.start(1)] + section + markdown[match.end(1) :]


def _gallery(markdown: str, config) -> str:
    """The figures page lists every PNG in docs/figures/ (whatever the last reproduce run drew)."""
    pngs = sorted((Path(config["docs_dir"]) / "figures").glob("*.png"))
    if not pngs:
        return markdown + "\n*No figures in `docs/figures/` yet.*\n"
    return markdown + "\n" + "\n".join(f"## {p.stem}\n\n![{p.name}]({p.name})\n" for p in pngs)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "figures/index.md":
        return _gallery(markdown, config)
    if not page.file.src_uri.startswith("api/"):
        markdown = _link_code_names(markdown, files)
    return _add_figures(markdown, page, config)


def _add_figures(markdown: str, page, config) -> str:
    match = _SECTION.search(markdown)
    if not match:
        return markdown
    section = match.group(1)
    figures_dir = Path(config["docs_dir"]) / "figures"
    page_dir = posixpath.dirname(page.file.src_uri)
    names = []
    for png in _PNG.finditer(section):
        name = png.group(1)
        if name in names or re.search(r"!\[[^\]]*\]\([^)]*" + re.escape(name) + r"\)", section):
            continue
        names.append(name)
    if not names:
        return markdown
    extra = []
    for name in names:
        if (figures_dir / name).is_file():
            rel = posixpath.relpath(f"figures/{name}", page_dir or ".")
            extra.append(f"![{name}]({rel})\n")
        else:
            extra.append(
                f"*`{name}` is not in the site's `docs/figures/` yet: run `opd-toys reproduce` and copy "
                f"its `figures/*.png` there (see the [overview]({posixpath.relpath('index.md', page_dir or '.')})).*\n"
            )
    end = match.end(1)
    return markdown[:end].rstrip("\n") + "\n\n" + "\n".join(extra) + "\n" + markdown[end:]
