"""Reading the markdown tables the benchmark scripts print, for their smoke tests."""

from __future__ import annotations

import re


def table(output: str, header: str) -> list[list[str]]:
    """The cells of the rows of the markdown table in `output` whose header row starts with `header`."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table headed {header!r} in the output:\n{output}"
    assert lines[start + 1].startswith("|-"), f"{header!r}: no separator row under the header"
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, f"the table headed {header!r} has no rows:\n{output}"
    return rows


def number(cell: str) -> float:
    """A table cell's (first) number, without its unit: '1,881,736', '+0.0012', '7.59x', '0.31%', '22.8 MB'."""
    match = re.match(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?", cell)
    assert match, f"no number in the cell {cell!r}"
    return float(match.group().replace(",", ""))
