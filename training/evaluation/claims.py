"""The claims table: each qualitative claim of the paper, checked by a rule computed
from the numbers of the paper-level report; nothing is hard-coded.

:func:`compute_claims` takes ``evaluation.json``'s dict and returns rows
``{"claim", "rule", "verdict", "evidence"}``, ``verdict`` one of ``supported``,
``not supported`` and ``undetermined`` (a number the rule needs is missing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scoring.features import LAYER_NAMES, METRIC_NAMES, feature_names
from training.evaluation.concepts import CORRECT_VS_WRONG

__all__ = ["MATCH_TOLERANCE", "compute_claims"]

GRADIENT_FEATURES = [name for name in feature_names() if "@" in name]
REGULARIZED = ("lasso", "ridge", "elastic_net")
#: Tolerance of "matches": a difference in AUROC / AUPR smaller than this is a tie.
MATCH_TOLERANCE = 0.01


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
