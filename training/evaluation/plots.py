"""The report's plots, as PNG files: violin plots and ROC/PR curves of one member's
paper-level scores, and reliability diagrams of the served heads.

Each function takes the data it draws and the folder, and returns the file names it
wrote (relative to that folder), in the order the report shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from scoring.features import METRIC_NAMES, feature_names  # noqa: E402

__all__ = ["curve_plots", "reliability_plots", "violin_plots"]


def _signed_log(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log10(1.0 + np.abs(values))


def violin_plots(plot_data: dict[str, Any], plots_dir: Path) -> list[str]:
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


def curve_plots(plot_data: dict[str, Any], plots_dir: Path) -> list[str]:
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


def reliability_plots(report: dict[str, Any], plots_dir: Path) -> list[str]:
    """Reliability diagrams of the served p_correct and p_ood."""
    service = report.get("service_level")
    if not service:
        return []
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for axis, name in zip(axes, ("p_correct", "p_ood"), strict=True):
        summary = service["calibration"][name]
        points = summary["reliability"]
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        axis.plot(points["predicted"], points["observed"], marker="o", label=name)
        axis.set(
            xlabel=f"mean predicted {name}",
            ylabel="observed frequency",
            title=f"{name}: ECE {summary['ece']:.4f}, Brier {summary['brier']:.4f}",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        axis.legend(loc="upper left")
    figure.tight_layout()
    file = "reliability_service_heads.png"
    figure.savefig(plots_dir / file, dpi=90)
    plt.close(figure)
    return [file]
