"""Plain-text output shared by the commands and the benchmarks: aligned tables, messages on stderr."""
from __future__ import annotations

import sys
from typing import Any, Iterable


def table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> str:
    """A plain-text table with aligned columns (floats in 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    header = [str(h) for h in header]
    body = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a progress setting: True shows the bar, False hides it, None leaves it to tqdm (shown
    only when stderr is a terminal, so logs of batch jobs hold no bars)."""
    return None if progress is None else not progress


def eprint(*a: Any) -> None:
    """Print to stderr, flushed: progress and notes, so that stdout holds only the summary and the JSON line."""
    print(*a, file=sys.stderr, flush=True)
