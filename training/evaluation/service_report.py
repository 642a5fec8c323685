"""The service-level part of the report: the summary table the report opens with,
ablations, calibration, head selection and threshold (its plots are in
:mod:`training.evaluation.plots`).

Input: ``report["service_level"]`` as :mod:`training.evaluation.service_level` wrote it.
Tables are ``(header, rows)`` of strings, as in :mod:`training.evaluation.report`.
"""

from __future__ import annotations

from typing import Any

from training.evaluation.concepts import CORRECT_VS_WRONG

__all__ = ["service_tables"]

Table = tuple[list[str], list[list[str]]]


def _concepts(service: dict[str, Any]) -> list[str]:
    return [CORRECT_VS_WRONG, *service["concepts"]]


def _label(service: dict[str, Any], concept: str) -> str:
    seen = service["concepts"].get(concept, {}).get("seen", False)
    return concept + (" (seen)" if seen else "")


def _triple(record: dict[str, Any]) -> str:
    def number(value):
        return "n/a" if value is None else f"{value:.4f}"

    return " / ".join(number(record[key]) for key in ("auroc", "aupr_out", "fpr_at_95_tpr"))


def summary_table(service: dict[str, Any]) -> Table:
    """Served heads, every served score and the best single input, on every concept.

    Cells are AUROC / AUPR-Out / FPR at 95% TPR; the best AUROC of a column is bold.
    """
    concepts = _concepts(service)
    lookup = {(r["kind"], r["score"], r["concept"]): r for r in service["records"]}
    rows_spec = [("head", "p_ood"), ("head", "p_correct")]
    rows_spec += list(
        dict.fromkeys((r["kind"], r["score"]) for r in service["records"] if r["kind"] == "score")
    )
    best_auroc = {
        concept: max(
            (
                r["auroc"]
                for r in service["records"]
                if r["concept"] == concept and r["auroc"] is not None
            ),
            default=None,
        )
        for concept in concepts
    }

    def cell(record):
        text = _triple(record)
        best = best_auroc[record["concept"]]
        return f"**{text}**" if best is not None and record["auroc"] == best else text

    rows = []
    for kind, score in rows_spec:
        rows.append([score, kind, *[cell(lookup[(kind, score, c)]) for c in concepts]])
    best_single = []
    for concept in concepts:
        singles = [
            r for r in service["records"] if r["kind"] == "single" and r["concept"] == concept
        ]
        top = max(singles, key=lambda r: -1 if r["auroc"] is None else r["auroc"])
        best_single.append(f"{top['score']}: {cell(top)}")
    rows.append(["best single input", "single", *best_single])
    header = ["score", "kind", *[_label(service, c) for c in concepts]]
    return header, rows


def singles_table(service: dict[str, Any]) -> Table:
    """AUROC of every head input used alone (direction fixed on calibration data)."""
    concepts = _concepts(service)
    lookup = {(r["score"], r["concept"]): r for r in service["records"] if r["kind"] == "single"}
    names = list(dict.fromkeys(score for score, _ in lookup))

    def auroc(record):
        return "n/a" if record["auroc"] is None else f"{record['auroc']:.4f}"

    rows = [[name, *[auroc(lookup[(name, c)]) for c in concepts]] for name in names]
    return ["head input", *[_label(service, c) for c in concepts]], rows


def ablation_table(service: dict[str, Any]) -> Table:
    """The served heads refitted without one group of inputs (AUROC / AUPR-Out / FPR95)."""
    concepts = _concepts(service)
    full = {
        r["concept"]: r
        for r in service["records"]
        if r["kind"] == "head"
        and r["score"] == ("p_correct" if r["concept"] == CORRECT_VS_WRONG else "p_ood")
    }
    lookup = {(r["kind"], r["concept"]): r for r in service["ablations"]}
    variants = list(dict.fromkeys(r["kind"] for r in service["ablations"]))
    rows = [["all inputs (served)", *[_triple(full[c]) for c in concepts]]]
    rows += [[variant, *[_triple(lookup[(variant, c)]) for c in concepts]] for variant in variants]
    return ["heads", *[_label(service, c) for c in concepts]], rows


def calibration_table(service: dict[str, Any]) -> Table:
    rows = []
    for name, summary in service["calibration"].items():
        rows.append(
            [
                name,
                f"{summary['ece']:.4f}",
                f"{summary['brier']:.4f}" if "brier" in summary else "",
                str(summary.get("count", "")),
                summary.get("data", ""),
            ]
        )
    return ["probability", "ECE", "Brier", "images", "held-out data"], rows


def selection_table(service: dict[str, Any]) -> Table:
    rows = []
    heads = service["heads"]
    for head, selection in heads["selection"].items():
        for kind, result in selection["candidates"].items():
            detail = result.get("held_out_concept_auroc") or {}
            rows.append(
                [
                    head,
                    kind + (" (chosen)" if kind == selection["chosen"] else ""),
                    f"{result['mean_auroc']:.4f}",
                    f"{result['worst_auroc']:.4f}" if "worst_auroc" in result else "",
                    ", ".join(f"{c}: {v:.4f}" for c, v in detail.items()),
                ]
            )
    rows.append(
        [
            "is_ood threshold",
            f"{heads['threshold']['value']:.6f}",
            "",
            "",
            heads["threshold"]["rule"],
        ]
    )
    header = ["head", "candidate", "cross-validated AUROC (mean)", "worst held-out concept"]
    return [*header, "per held-out concept"], rows


def service_tables(report: dict[str, Any]) -> list[tuple[str, str, Table]]:
    """(css class, caption, table) of the service level, in report order."""
    service = report.get("service_level")
    if not service:
        return []
    return [
        (
            "summary",
            "Summary: the served heads against every score, ensemble level, official test "
            "split (AUROC / AUPR-Out / FPR at 95% TPR; best AUROC in bold; (seen) = the "
            "concept's training part was used to fit the heads)",
            summary_table(service),
        ),
        (
            "ablations",
            "Ablations: the served heads without one group of inputs",
            ablation_table(service),
        ),
        ("calibration", "Calibration of the served probabilities", calibration_table(service)),
        ("selection", "Head selection and the is_ood threshold", selection_table(service)),
        ("singles", "Every head input alone (AUROC)", singles_table(service)),
    ]
