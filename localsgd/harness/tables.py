"""Fixed-width text tables: a header, a rule, one line per row. Every table the commands print
(training rows, studies, comparisons, phases, the demo, the cost model) is made here."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from localsgd.harness.measures import Metric


@dataclass(frozen=True)
class Column:
    """A column: its title, width, how a row's cell reads (``cell(row)`` gives the text) and its
    alignment (right unless ``left``)."""

    title: str
    width: int
    cell: Callable[[Any], str]
    left: bool = False

    def fit(self, text: str) -> str:
        return f"{text:<{self.width}}" if self.left else f"{text:>{self.width}}"


def render(columns: list[Column], rows: Iterable[Any], rule: bool = True) -> str:
    """The rows as a table (``rule``: a line of dashes under the header)."""
    head = " ".join(c.fit(c.title) for c in columns)
    lines = [head, "-" * len(head)] if rule else [head]
    lines += [" ".join(c.fit(c.cell(r)) for c in columns) for r in rows]
    return "\n".join(lines)


def plus_minus(v: tuple[float, float] | None, metric: Metric) -> str:
    """A mean ± std over seeds (``-``: no seed finished) as ``metric`` shows values."""
    return "-" if v is None else f"{metric.show(v[0])} ± {metric.show(v[1])}"
