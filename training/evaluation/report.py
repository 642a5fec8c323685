"""The evaluation report: ``evaluation.json``, ``report.md``, ``index.html`` and plots.

``evaluation.json`` is exactly what ``GET /metrics`` serves (DESIGN.md section 5):
``{"records": [...], "known_unknowns": [...], "meta_classifiers": [...],
"baselines": [...], "claims": [...], "members": [...], ...}``; each record is
``{"score", "kind", "concept", "auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}`` with
every value ``{"mean", "std"}`` over members (``null`` where undefined).

The claims come from :mod:`training.evaluation.claims`, the plots from
:mod:`training.evaluation.plots`, the service-level tables from
:mod:`training.evaluation.service_report`; this module lays them out. ``index.html`` is
static and self-contained (inline CSS, no scripts); its tables carry class names
(``records``, ``known-unknowns``, ``heads``, ``claims``, ``members``) and it shows the
PNG plots through relative ``plots/...`` paths.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from training.evaluation.plots import curve_plots, reliability_plots, violin_plots
from training.evaluation.service_report import service_tables

__all__ = ["write_report", "METRIC_LABELS"]

#: Column titles of the four metrics.
METRIC_LABELS = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "fpr_at_95_tpr": "FPR@95TPR",
}

# ------------------------------------------------------------------------------ tables


def _cell(value: dict[str, float | None]) -> str:
    if value["mean"] is None:
        return "n/a"
    return f"{value['mean']:.4f} ± {value['std']:.4f}"


def _record_tables(report: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """One table per metric: rows = scores, columns = comparisons (the paper's layout)."""
    comparisons = report["comparisons"]
    scores: list[tuple[str, str]] = []
    for record in report["records"]:
        if (record["kind"], record["score"]) not in scores:
            scores.append((record["kind"], record["score"]))
    lookup = {(r["score"], r["concept"]): r for r in report["records"]}
    tables = {}
    for metric, label in METRIC_LABELS.items():
        header = ["score", "kind", *comparisons]
        rows = [
            [score, kind, *[_cell(lookup[(score, c)][metric]) for c in comparisons]]
            for kind, score in scores
        ]
        tables[label] = (header, rows)
    return tables


def _known_unknown_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows_in = report["known_unknowns"]
    sets = list(dict.fromkeys(r["training_set"] for r in rows_in))
    lookup = {(r["model"], r["training_set"], r["concept"]): r for r in rows_in}
    records = {(r["score"], r["concept"]): r for r in report["records"]}
    header = ["model", "metric", "concept", "entropy", "softmax_baseline", *sets]
    rows = []
    for model in dict.fromkeys(r["model"] for r in rows_in):
        for metric, label in METRIC_LABELS.items():
            for concept in report["comparisons"]:
                cells = []
                for training_set in sets:
                    row = lookup[(model, training_set, concept)]
                    cells.append(_cell(row[metric]) + (" (seen)" if row["seen"] else ""))
                rows.append(
                    [
                        model,
                        label,
                        concept,
                        _cell(records[("entropy", concept)][metric]),
                        _cell(records[("softmax_baseline", concept)][metric]),
                        *cells,
                    ]
                )
    return header, rows


def _member_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [
        "member",
        "seed",
        "validation_images",
        "test_images",
        "validation_accuracy",
        "test_accuracy",
        "validation_wrong",
        "test_wrong",
    ]
    rows = [
        [f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k]) for k in keys]
        for m in report["members"]
    ]
    return keys, rows


def _claims_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["claim", "rule", "numbers", "verdict"]
    return header, [[c[k] for k in header] for c in report["claims"]]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *[line(r) for r in rows]])


def _html_cell(text: str) -> str:
    """Escaped cell text; Markdown bold (``**...**``) becomes <strong>."""
    escaped = html.escape(text)
    while escaped.count("**") >= 2:
        escaped = escaped.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
    return escaped


def _html_table(css_class: str, header: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return (
        f'<table class="{css_class}"><caption>{html.escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


# ------------------------------------------------------------------------------ writer

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.8em; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def write_report(result, report_dir: Path) -> dict[str, Path]:
    """Write ``evaluation.json``, ``report.md``, ``index.html`` and ``plots/*.png``."""
    report_dir = Path(report_dir)
    plots_dir = report_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    report = result.report

    json_path = report_dir / "evaluation.json"
    json_path.write_text(json.dumps(report, indent=1, allow_nan=False))

    plots = {
        "Reliability of the served heads": reliability_plots(report, plots_dir),
        "Violin plots (paper level, one member)": violin_plots(result.plot_data, plots_dir),
        "ROC and precision-recall curves (paper level, one member)": curve_plots(
            result.plot_data, plots_dir
        ),
    }
    tables = [
        *service_tables(report),
        ("members", "Paper level: members", _member_table(report)),
        ("claims", "Claims of the paper, checked against these numbers", _claims_table(report)),
        *[
            ("records", f"{label} (mean ± std over members)", table)
            for label, table in _record_tables(report).items()
        ],
        (
            "known-unknowns",
            "Known unknowns: meta classifier refitted with known-unknown images",
            _known_unknown_table(report),
        ),
    ]

    markdown = ["# Evaluation report", "", report["orientation"], ""]
    for _, caption, (header, rows) in tables:
        markdown += [f"## {caption}", "", _markdown(header, rows), ""]
    markdown += ["## Plots", ""]
    for section, files in plots.items():
        markdown += [f"![{section}: {file}](plots/{file})" for file in files]
    (report_dir / "report.md").write_text("\n".join(markdown) + "\n")

    body = [f"<h1>Evaluation report</h1><p>{html.escape(report['orientation'])}</p>"]
    for css_class, caption, (header, rows) in tables:
        body.append(_html_table(css_class, header, rows, caption))
    for section, files in plots.items():
        body.append(f"<h2>{html.escape(section)}</h2>")
        body += [
            f'<img class="plot" src="plots/{html.escape(file)}" alt="{html.escape(file)}">'
            for file in files
        ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Evaluation report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    (report_dir / "index.html").write_text(page)
    return {
        "json": json_path,
        "markdown": report_dir / "report.md",
        "html": report_dir / "index.html",
    }
