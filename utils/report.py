"""Readable summary tables of verification results (training, evaluation scripts)."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

from prettytable import PrettyTable

# the paper's column order and names for the five high-quality sets
PAPER_COLUMNS = (("lfw", "LFW"), ("cfp_fp", "CFPFP"), ("cplfw", "CPLFW"), ("calfw", "CALFW"),
                 ("agedb_30", "AGEDB"))


def results_row(results: Mapping[str, float], set_names: Sequence[str], stage: str) -> Dict[str, float]:
    """``{column title: accuracy in %}`` for the sets present, in the paper's order, plus ``AVG``."""
    row: Dict[str, float] = {}
    ordered = [(key, title) for key, title in PAPER_COLUMNS if key in set_names]
    ordered += [(name, name.upper()) for name in set_names if name not in dict(PAPER_COLUMNS)]
    for key, title in ordered:
        value = results.get(f"{key}_{stage}_acc")
        if value is not None:
            row[title] = 100.0 * float(value)
    if row:
        row["AVG"] = sum(row.values()) / len(row)
    return row


def format_results_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A table with one line per model/run: ``{run name: {column: accuracy %}}``."""
    columns: list = []
    for row in rows.values():
        columns += [c for c in row if c not in columns]
    table = PrettyTable(["model"] + columns)
    for name, row in rows.items():
        table.add_row([name] + [f"{row[c]:.2f}" if c in row else "-" for c in columns])
    return table.get_string()


def results_summary(results: Mapping[str, float], set_names: Sequence[str], stage: str = "test",
                    title: str = "results") -> str:
    """One run's verification accuracies (%) as the paper's table, under a title line (for the
    command line to print)."""
    row = results_row(results, set_names, stage)
    if not row:
        return f"{title}: no verification results"
    return f"\n{title} (verification accuracy, %):\n" + format_results_table({"this run": row})
