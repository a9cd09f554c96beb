"""Griffe extension: render the RST bits of opd_ref's Google-style docstrings as Markdown.

The docstrings follow Google style for their sections (``Args:``, ``Returns:``) but write math and
tables the Sphinx way.  Before griffe parses a docstring this extension rewrites, outside code:

* a ``.. math::`` directive and its indented block -> one ``$$ ... $$`` display block per
  blank-line-separated equation (pymdownx.arithmatex, rendered by MathJax in the browser);
* ``:math:`...``` -> ``$...$``;
* ``:func:`~a.b.c``` / ``:class:`X``` / ``:meth:`` ... -> a mkdocstrings cross-reference when the
  target is a public object of ``opd_ref``, otherwise inline code;
* an RST "simple table" (``===  ===`` rules) -> a Markdown pipe table;
* in a ``Reference:`` / ``References:`` paragraph, a citation key (docs/bibliography.md) written as
  ````key```` -> a link to its entry in the bibliography page.

Loaded from ``mkdocs.yml`` (``extensions: - docs/_site/griffe_rst.py``); it changes only what the
site shows, never the source.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import griffe

CITATION_KEYS = (
    "diffusionopd", "flowgrpo", "crd", "dibregman", "dimo", "dmd", "dmd2", "diffinstruct", "gopd",
    "vopd", "rtdmd", "nft", "tm-opd",
    "diffusiongan",
)

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")
_CITE = re.compile(r"``(" + "|".join(re.escape(k) for k in CITATION_KEYS) + r")``")
_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _math_blocks(lines: list[str]) -> list[str]:
    """``.. math::`` + indented block -> ``$$`` blocks, at the directive's indentation."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        pad = " " * base
        body: list[str] = []
        inline = stripped[len(".. math::"):].strip()
        if inline:
            body.append(inline)
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():  # trailing blank lines belong to the text after
            body.pop()
            i -= 1
        # one display block per blank-line-separated equation (RST's convention)
        chunks: list[list[str]] = [[]]
        for b in body:
            if b.strip():
                chunks[-1].append(b.strip())
            elif chunks[-1]:
                chunks.append([])
        out.append("")
        for chunk in chunks:
            if chunk:
                out.extend([pad + "$$"] + [pad + c for c in chunk] + [pad + "$$", ""])
        if out and not out[-1].strip() and i < len(lines) and not lines[i].strip():
            out.pop()
    return out


def _simple_tables(lines: list[str]) -> list[str]:
    """RST simple tables (rule / header / rule / rows / rule) -> Markdown pipe tables."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        if not (_RULE.match(lines[i]) and i + 2 < len(lines) and _RULE.match(lines[i + 2])):
            out.append(lines[i])
            i += 1
            continue
        rule = lines[i]
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
        pad = " " * _indent(rule)
        j = i + 3
        rows = [lines[i + 1]]
        while j < len(lines) and not _RULE.match(lines[j]):
            if lines[j].strip():
                rows.append(lines[j])
            j += 1
        if j == len(lines):  # no closing rule: not a table
            out.append(lines[i])
            i += 1
            continue

        def cells(row: str) -> list[str]:
            # cells are separated by 2+ spaces; fall back to the rule's column spans otherwise
            split = re.split(r"\s{2,}", row.strip())
            if len(split) == len(spans):
                return [c.replace("|", "\\|") for c in split]
            res = []
            for k, (a, _) in enumerate(spans):
                end = spans[k + 1][0] if k + 1 < len(spans) else len(row)
                res.append(row[a:end].strip().replace("|", "\\|"))
            return res

        table = [cells(r) for r in rows]
        out.append("")
        out.append(pad + "| " + " | ".join(table[0]) + " |")
        out.append(pad + "|" + "|".join(["---"] * len(spans)) + "|")
        out.extend(pad + "| " + " | ".join(r) + " |" for r in table[1:])
        out.append("")
        i = j + 1
    return out


def _resolve(obj: griffe.Object, target: str) -> Optional[str]:
    """Dotted path of a public opd_ref object that ``target`` names from ``obj``'s scope."""
    candidates = [target]
    scope: Any = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        candidates.append(f"{scope.path}.{target}")
        scope = scope.parent
    for path in candidates:
        if not path.startswith("opd_ref"):
            continue
        try:
            found = obj.modules_collection[path]
        except (KeyError, AttributeError, ValueError):
            continue
        try:
            if found.is_alias:
                path = found.target_path
                found = obj.modules_collection[path]
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if any(part.startswith("_") for part in path.split(".")):
            return None
        if found.is_attribute and found.docstring is None:
            return None  # undocumented attributes are not rendered: nothing to link to
        return path
    return None


def _roles(text: str, obj: griffe.Object) -> str:
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)

    def xref(m: re.Match) -> str:
        tilde, target = m.group(1), m.group(2)
        label = target.split(".")[-1] if tilde else target
        path = _resolve(obj, target.lstrip("."))
        return f"[`{label}`][{path}]" if path else f"`{label}`"

    return _XREF_ROLE.sub(xref, text)


_COMBINED_ARG = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(\s*(?:\([^)]*\))?\s*:\s.*)$")
_SECTION_HEAD = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def _split_combined_args(lines: list[str]) -> list[str]:
    """``a, b: text`` in an ``Args:`` section -> one entry per name, each with the full text."""
    out: list[str] = []
    section, section_indent = None, 0
    i = 0
    while i < len(lines):
        line = lines[i]
        head = _SECTION_HEAD.match(line)
        if head:
            section, section_indent = head.group(2), len(head.group(1))
        elif line.strip() and _indent(line) <= section_indent:
            section = None
        m = _COMBINED_ARG.match(line) if section in ("Args", "Arguments", "Parameters") else None
        if not m:
            out.append(line)
            i += 1
            continue
        indent, names, rest = m.group(1), [n.strip() for n in m.group(2).split(",")], m.group(3)
        cont = []
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(indent):
            cont.append(lines[j])
            j += 1
        for name in names:
            out.append(f"{indent}{name}{rest}")
            out.extend(cont)
        i = j
    return out


def _citations(lines: list[str]) -> list[str]:
    out, in_ref = [], False
    for line in lines:
        if re.match(r"^\s*References?:", line):
            in_ref = True
        elif not line.strip():
            in_ref = False
        if in_ref:
            line = _CITE.sub(lambda m: f"[`{m.group(1)}`][cite-{m.group(1)}]", line)
        out.append(line)
    return out


def rst_to_markdown(text: str, obj: griffe.Object) -> str:
    """The conversion described in the module docstring (code spans are left alone)."""
    lines = text.split("\n")
    lines = _split_combined_args(lines)
    lines = _math_blocks(lines)
    lines = _simple_tables(lines)
    lines = _citations(lines)
    out, in_fence = [], False
    for line in lines:
        if line.strip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence or line.strip() in ("$$",) else _roles(line, obj))
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring once its object has been loaded (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)
