"""What the docs test reads in a Markdown file: fenced blocks (with their `docs-test` marker),
inline code spans, tables and the raw text of each paragraph or cell (markdown-it-py parses it,
so fences in list items, escaped pipes in tables and the like come out right)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

#: `<!-- docs-test: skip: <reason> -->` on the line right before a fence: not run, for that reason.
MARKER = re.compile(r"<!--\s*docs-test:(?P<body>.*?)-->", re.S)
SKIP = re.compile(r"\s*skip\s*:\s*(?P<reason>\S.*\S)\s*", re.S)


@dataclass(frozen=True)
class Fence:
    """One fenced block; `skip` is the marker's reason when it is marked not runnable."""

    path: Path
    line: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass(frozen=True)
class Table:
    """A table: its header cells and rows, each cell as its raw Markdown."""

    path: Path
    line: int
    header: list[str]
    rows: list[list[str]]


@dataclass
class Doc:
    """One Markdown file as the docs test sees it."""

    path: Path
    fences: list[Fence] = field(default_factory=list)
    spans: list[tuple[int, str]] = field(default_factory=list)  # (line, inline code)
    inlines: list[tuple[int, str]] = field(default_factory=list)  # (line, raw Markdown)
    tables: list[Table] = field(default_factory=list)
    bad_markers: list[str] = field(default_factory=list)  # where a marker is malformed or loose


@functools.cache
def read_doc(path: Path) -> Doc:
    """Parse `path` (cached: the docs do not change during a test run)."""
    tokens = MarkdownIt("commonmark").enable("table").parse(path.read_text())
    doc = Doc(path)
    pending: tuple[int, str] | None = None  # a marker: (the line a fence must start on, body)
    table: Table | None = None
    row: list[str] = []
    for token in tokens:
        line = token.map[0] + 1 if token.map else 0
        if pending is not None and token.map is not None and not (
            token.type == "fence" and token.map[0] == pending[0]
        ):
            doc.bad_markers.append(f"{path.name}:{pending[0]}: a marker not right before a fence")
            pending = None
        if token.type == "html_block" and (found := MARKER.search(token.content)):
            pending = (token.map[1], found["body"])
        elif token.type == "fence":
            skip = None
            if pending is not None:
                reason = SKIP.fullmatch(pending[1])
                if reason is None:
                    doc.bad_markers.append(f"{path.name}:{pending[0]}: write "
                                           "<!-- docs-test: skip: <reason> -->")
                skip = reason["reason"] if reason else "?"
                pending = None
            lang = token.info.split()[0] if token.info.strip() else ""
            doc.fences.append(Fence(path, line, lang, token.content, skip))
        elif token.type == "table_open":
            table = Table(path, line, [], [])
        elif token.type == "table_close" and table is not None:
            doc.tables.append(table)
            table = None
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and table is not None:
            (table.rows.append if table.header else table.header.extend)(row)
        elif token.type == "inline":
            doc.inlines.append((line, token.content))
            doc.spans += [(line, c.content) for c in token.children or []
                          if c.type == "code_inline"]
            if table is not None:
                row.append(token.content)
    if pending is not None:
        doc.bad_markers.append(f"{path.name}:{pending[0]}: a marker not right before a fence")
    return doc
