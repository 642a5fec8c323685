"""The README's headline table, written from a bundle's own evaluation.

    python -m tools.headline_table [--bundle-dir models/default]

prints the markdown table of the README's "The default bundle" section: the served heads
and every served score on every concept (AUROC / AUPR-Out / FPR at 95% TPR), ensemble
level, official test split, plus the best single head input per column.
``tests/test_readme_numbers.py`` checks that the README holds exactly this table, so the README
cannot keep numbers of an older bundle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["COLUMNS", "headline_table"]

REPOSITORY = Path(__file__).resolve().parents[1]

#: (concept, column title): unseen concepts first, then those the heads were fitted on.
COLUMNS = (
    ("mnist_correct_vs_wrong", "wrong predictions"),
    ("notmnist", "notMNIST"),
    ("notmnist_reframed", "notMNIST re-framed"),
    ("omniglot_latin", "Omniglot Latin"),
    ("normal_noise", "normal noise"),
    ("omniglot_other", "other Omniglot"),
    ("cifar10", "CIFAR-10"),
    ("synthesized", "synthesized"),
)
ROWS = (
    "p_ood",
    "p_correct",
    "softmax_baseline",
    "predictive_entropy",
    "mutual_information",
    "energy",
    "mahalanobis",
    "knn",
    "vim",
    "channel_mahalanobis",
)


def _cell(record: dict) -> str:
    return f"{record['auroc']:.3f} / {record['aupr_out']:.2f} / {record['fpr_at_95_tpr']:.2f}"


def headline_table(service_level: dict) -> str:
    """The markdown table from ``evaluation.json``'s ``service_level`` section."""
    seen = {name for name, concept in service_level["concepts"].items() if concept["seen"]}
    by_key = {
        (r["score"], r["concept"]): r
        for r in service_level["records"]
        if r["kind"] in ("head", "score")
    }
    titles = [title + (" (seen)" if concept in seen else "") for concept, title in COLUMNS]
    lines = ["| score | " + " | ".join(titles) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for score in ROWS:
        cells = [_cell(by_key[score, concept]) for concept, _ in COLUMNS]
        lines.append(f"| `{score}` | " + " | ".join(cells) + " |")
    best = []
    for concept, _ in COLUMNS:
        singles = [
            r for r in service_level["records"] if r["kind"] == "single" and r["concept"] == concept
        ]
        top = max(singles, key=lambda r: r["auroc"])
        best.append(f"{top['auroc']:.3f} (`{top['score']}`)")
    lines.append("| best single head input | " + " | ".join(best) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle-dir", type=Path, default=REPOSITORY / "models" / "default")
    args = parser.parse_args(argv)
    from scoring.bundle import load_bundle

    print(headline_table(load_bundle(args.bundle_dir).evaluation()["service_level"]))


if __name__ == "__main__":
    main()
