"""The evaluation report: ``evaluation.json``, ``report.md``, ``index.html`` and plots.

``evaluation.json`` is exactly what ``GET /metrics`` serves (DESIGN.md section 5):
``{"records": [...], "known_unknowns": [...], "meta_classifiers": [...],
"baselines": [...], "claims": [...], "members": [...], ...}``; each record is
``{"score", "kind", "concept", "auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}`` with
every value ``{"mean", "std"}`` over members (``null`` where undefined).

The claims table restates each qualitative claim of the paper and checks it with a rule
computed from the numbers of this report; nothing is hard-coded. ``index.html`` is
static and self-contained (inline CSS, no scripts); its tables carry class names
(``records``, ``known-unknowns``, ``heads``, ``claims``, ``members``) and it shows the
PNG plots through relative ``plots/...`` paths.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from scoring.features import LAYER_NAMES, METRIC_NAMES, feature_names  # noqa: E402
from training.evaluation.service_report import service_plots, service_tables  # noqa: E402

__all__ = ["compute_claims", "write_report", "METRIC_LABELS"]

#: Column titles of the four metrics.
METRIC_LABELS = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "fpr_at_95_tpr": "FPR@95TPR",
}

CORRECT_VS_WRONG = "mnist_correct_vs_wrong"
GRADIENT_FEATURES = [name for name in feature_names() if "@" in name]
REGULARIZED = ("lasso", "ridge", "elastic_net")
#: Tolerance of "matches": a difference in AUROC / AUPR smaller than this is a tie.
MATCH_TOLERANCE = 0.01


# ----------------------------------------------------------------------------- claims


class _Numbers:
    """Mean values of the report, looked up by score, concept and metric."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.records = {(r["score"], r["concept"]): r for r in report["records"]}
        self.known = {
            (r["model"], r["training_set"], r["concept"]): r for r in report["known_unknowns"]
        }
        self.concepts = [c for c in report["comparisons"] if c != CORRECT_VS_WRONG]

    def get(self, score: str, concept: str, metric: str) -> float:
        record = self.records.get((score, concept))
        value = None if record is None else record[metric]["mean"]
        return float("nan") if value is None else float(value)

    def known_unknown(self, model: str, training_set: str, concept: str, metric: str) -> float:
        row = self.known.get((model, training_set, concept))
        value = None if row is None else row[metric]["mean"]
        return float("nan") if value is None else float(value)


def _verdict(condition: bool | None, *values: float) -> str:
    if condition is None or any(not math.isfinite(v) for v in values):
        return "undetermined"
    return "supported" if condition else "not supported"


def _fmt(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def _is_noise(concept: str) -> bool:
    return "noise" in concept


def compute_claims(report: dict[str, Any]) -> list[dict[str, str]]:
    """Each qualitative claim of the paper, the rule that checks it, the numbers, a verdict."""
    numbers = _Numbers(report)
    claims = []

    def claim(text: str, rule: str, evidence: str, verdict: str) -> None:
        claims.append({"claim": text, "rule": rule, "numbers": evidence, "verdict": verdict})

    # 1. gradient metrics match entropy for correct vs wrong
    entropy = numbers.get("entropy", CORRECT_VS_WRONG, "auroc")
    gradient = {name: numbers.get(name, CORRECT_VS_WRONG, "auroc") for name in GRADIENT_FEATURES}
    finite = {k: v for k, v in gradient.items() if math.isfinite(v)}
    best = max(finite, key=finite.get) if finite else None
    best_value = finite.get(best, float("nan")) if best else float("nan")
    claim(
        "Gradient metrics match entropy in separating correct from wrong predictions.",
        f"best gradient metric AUROC >= entropy AUROC - {MATCH_TOLERANCE} ({CORRECT_VS_WRONG})",
        f"entropy {_fmt(entropy)}; best gradient metric {best} {_fmt(best_value)}",
        _verdict(best_value >= entropy - MATCH_TOLERANCE, entropy, best_value),
    )

    # 2. mean, skewness, kurtosis unsuited to thresholding
    unsuited = [f"{m}@{layer}" for layer in LAYER_NAMES for m in ("mean", "skewness", "kurtosis")]
    suited = [f"{m}@{layer}" for layer in LAYER_NAMES for m in METRIC_NAMES[:4]]
    best_unsuited = np.nanmax([gradient[name] for name in unsuited])
    best_suited = np.nanmax([gradient[name] for name in suited])
    claim(
        "Mean, skewness and kurtosis of the gradient are unsuited to thresholding.",
        "best AUROC of any mean/skewness/kurtosis feature is at least 0.05 below the best "
        f"norm/min/max feature ({CORRECT_VS_WRONG})",
        f"best mean/skewness/kurtosis {_fmt(best_unsuited)}; best norm/min/max {_fmt(best_suited)}",
        _verdict(best_unsuited <= best_suited - 0.05, best_unsuited, best_suited),
    )

    # 3. regularized logistic regressions beat the GLM and match/beat the softmax baseline
    comparisons = [CORRECT_VS_WRONG, *numbers.concepts]

    def mean_over(score: str, metric: str) -> float:
        values = [numbers.get(score, c, metric) for c in comparisons]
        return float(np.mean(values)) if all(math.isfinite(v) for v in values) else float("nan")

    glm = mean_over("glm", "auroc")
    softmax = mean_over("softmax_baseline", "auroc")
    regularized = {name: mean_over(name, "auroc") for name in REGULARIZED}
    worst = min(regularized.values())
    claim(
        "Regularized logistic regressions beat the GLM and match or beat the softmax baseline.",
        "for LASSO, ridge and elastic net, the AUROC averaged over all comparisons is >= the "
        f"GLM's and >= the softmax baseline's - {MATCH_TOLERANCE}",
        "; ".join(f"{k} {_fmt(v)}" for k, v in regularized.items())
        + f"; glm {_fmt(glm)}; softmax baseline {_fmt(softmax)}",
        _verdict(worst >= glm and worst >= softmax - MATCH_TOLERANCE, worst, glm, softmax),
    )

    # 4. gradient metrics separate noise poorly on their own
    noise = [c for c in numbers.concepts if _is_noise(c)]
    if noise:
        noise_best = float(
            np.mean([max(numbers.get(g, c, "auroc") for g in GRADIENT_FEATURES) for c in noise])
        )
        noise_entropy = float(np.mean([numbers.get("entropy", c, "auroc") for c in noise]))
        claim(
            "Gradient metrics on their own separate noise poorly.",
            "the best single gradient metric's AUROC against noise (mean over noise "
            "concepts) is below the entropy's",
            f"best gradient metric {_fmt(noise_best)}; entropy {_fmt(noise_entropy)} "
            f"({', '.join(noise)})",
            _verdict(noise_best < noise_entropy, noise_best, noise_entropy),
        )

    # 5. combining with entropy improves AUPR-Out on unknown concepts
    meta_names = [r["name"] for r in report["meta_classifiers"]]
    concept_means = {
        name: float(np.mean([numbers.get(name, c, "aupr_out") for c in numbers.concepts]))
        for name in [*meta_names, "entropy"]
    }
    best_meta = max(meta_names, key=lambda n: np.nan_to_num(concept_means[n], nan=-1.0))
    wins = sum(
        numbers.get(best_meta, c, "aupr_out") > numbers.get("entropy", c, "aupr_out")
        for c in numbers.concepts
    )
    claim(
        "Combining gradient metrics with entropy in a meta classifier improves AUPR-Out on "
        "unknown concepts.",
        "the best meta classifier (fitted on validation only) has a higher AUPR-Out than the "
        "entropy averaged over the unknown concepts",
        f"{best_meta} {_fmt(concept_means[best_meta])} vs entropy "
        f"{_fmt(concept_means['entropy'])}; higher on {wins} of {len(numbers.concepts)} concepts",
        _verdict(
            concept_means[best_meta] > concept_means["entropy"],
            concept_means[best_meta],
            concept_means["entropy"],
        ),
    )

    # 6. 200 uniform-noise images raise AUPR-Out on all unknown concepts; 7. normal noise
    models = sorted({key[0] for key in numbers.known})
    model = "neural_net" if "neural_net" in models else (models[0] if models else None)
    plain, uniform, normal = "validation", "validation+uniform_noise", "validation+normal_noise"
    if model is not None and (model, uniform, CORRECT_VS_WRONG) in numbers.known:
        unseen = [c for c in numbers.concepts if not _is_noise(c)]
        gains = {
            c: numbers.known_unknown(model, uniform, c, "aupr_out")
            - numbers.known_unknown(model, plain, c, "aupr_out")
            for c in unseen
        }
        claim(
            "200 uniform-noise images as known unknowns raise AUPR-Out on all unknown concepts.",
            f"{model}: AUPR-Out of '{uniform}' minus '{plain}' is > 0 for every unknown "
            "concept other than noise",
            "; ".join(f"{c} {v:+.4f}" for c, v in gains.items()),
            _verdict(all(v > 0 for v in gains.values()), *gains.values()),
        )
        if (model, normal, CORRECT_VS_WRONG) in numbers.known:
            normal_gains = {
                c: numbers.known_unknown(model, normal, c, "aupr_out")
                - numbers.known_unknown(model, plain, c, "aupr_out")
                for c in unseen
            }
            uniform_mean = float(np.mean(list(gains.values())))
            normal_mean = float(np.mean(list(normal_gains.values())))
            in_distribution = numbers.known_unknown(
                model, normal, CORRECT_VS_WRONG, "auroc"
            ) - numbers.known_unknown(model, plain, CORRECT_VS_WRONG, "auroc")
            claim(
                "Normal noise helps less than uniform noise as known unknowns.",
                f"{model}: the mean AUPR-Out gain over non-noise concepts from 200 normal-noise "
                "images is below that from 200 uniform-noise images",
                f"uniform {uniform_mean:+.4f}; normal {normal_mean:+.4f}; in-distribution "
                f"AUROC change with normal noise {in_distribution:+.4f}",
                _verdict(normal_mean < uniform_mean, uniform_mean, normal_mean),
            )
    return claims


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


# ------------------------------------------------------------------------------- plots


def _signed_log(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log10(1.0 + np.abs(values))


def _violin_plots(plot_data: dict[str, Any], plots_dir: Path) -> list[str]:
    groups = {name: values for name, values in plot_data.get("groups", {}).items() if len(values)}
    if not groups:
        return []
    names = feature_names()
    shown = ["entropy", "softmax_baseline", *[f"{m}@all" for m in METRIC_NAMES]]
    files = []
    for score in shown:
        column = names.index(score)
        data = [values[:, column] for values in groups.values()]
        gradient = "@" in score
        if gradient:
            data = [_signed_log(values) for values in data]
        figure, axis = plt.subplots(figsize=(1.3 * len(groups) + 2, 4))
        axis.violinplot(data, showmedians=True)
        axis.set_xticks(range(1, len(groups) + 1), list(groups), rotation=30, ha="right")
        axis.set_ylabel(f"sign(v)·log10(1+|v|) of {score}" if gradient else score)
        axis.set_title(f"{score} by concept (member {plot_data['member']})")
        figure.tight_layout()
        file = f"violin_{score.replace('@', '_at_')}.png"
        figure.savefig(plots_dir / file, dpi=90)
        plt.close(figure)
        files.append(file)
    return files


def _curve_points(confidence: np.ndarray, positive: np.ndarray):
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(positive, confidence)
    precision, recall, _ = precision_recall_curve(~positive, -confidence)
    return fpr, tpr, recall, precision


def _curve_plots(plot_data: dict[str, Any], plots_dir: Path) -> list[str]:
    files = []
    for comparison, scores in plot_data.get("curves", {}).items():
        figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(10, 4.2))
        drawn = False
        for score, (confidence, positive) in scores.items():
            positive = np.asarray(positive, bool)
            if positive.all() or not positive.any():
                continue
            fpr, tpr, recall, precision = _curve_points(np.asarray(confidence), positive)
            roc_axis.plot(fpr, tpr, label=score)
            pr_axis.plot(recall, precision, label=score)
            drawn = True
        if not drawn:
            plt.close(figure)
            continue
        roc_axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        pr_axis.set(
            xlabel="recall (incorrect / OOD positive)", ylabel="precision", title="PR (Out)"
        )
        roc_axis.legend(fontsize=7, loc="lower right")
        figure.suptitle(f"{comparison} (member {plot_data['member']})")
        figure.tight_layout()
        file = f"curves_{comparison}.png"
        figure.savefig(plots_dir / file, dpi=90)
        plt.close(figure)
        files.append(file)
    return files


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
        "Reliability of the served heads": service_plots(report, plots_dir),
        "Violin plots (paper level, one member)": _violin_plots(result.plot_data, plots_dir),
        "ROC and precision-recall curves (paper level, one member)": _curve_plots(
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
