"""Service level: the served heads on ensemble inputs, fitted and measured honestly.

DESIGN.md section 4. The calibration split (held out from every member) and the
known-unknown training images are all the heads see; every headline number comes from
the official test split and from concept images no head was fitted on.

Stages, each a function:

1. :func:`ensemble_view` - engine outputs of all members for an image set, turned into
   head inputs and every served score by :mod:`scoring.answer` (the served computation);
2. :func:`select_head` - leave-one-concept-out cross-validation over the known-unknown
   concepts chooses the p_ood head kind (what transfers to an unseen concept); stratified
   cross-validation on calibration digits chooses the p_correct head kind;
3. :func:`fit_heads` - the chosen kinds refitted and probability-calibrated
   (``CalibratedClassifierCV``), and the is_ood threshold: the p_ood that 95% of held-out
   calibration digits stay below;
4. :func:`evaluate` - served heads, ablated heads and every single score on every
   concept (AUROC, AUPR-In, AUPR-Out, FPR at 95% TPR), calibration (ECE, Brier,
   reliability) on held-out data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.calibration import CalibratedClassifierCV, calibration_curve
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from scoring.answer import HEAD_INPUT_GROUPS, Heads, apply_heads, feature_space_of, head_inputs
from scoring.engine import EngineOutput, ScorerEngine
from scoring.scores import SCORE_DESCRIPTIONS, FeatureSpaceStatistics, ensemble_scores
from training.evaluation.concepts import CORRECT_VS_WRONG
from training.evaluation.metrics import threshold_metrics
from training.extraction import Extractor, GraphFiles, LocalExtractor

__all__ = [
    "EnsembleView",
    "HeadConfig",
    "ServiceLevelResult",
    "ensemble_view",
    "fit_heads",
    "run_service_level",
]

HEAD_KINDS = ("logistic", "logistic_strong", "neural_net", "boosted_trees", "soft_vote")

#: The kinds a ``soft_vote`` head averages the probabilities of (scikit-learn's
#: ``VotingClassifier``, ``voting="soft"``). A linear model and trees fail differently
#: on a concept they never saw: on the default bundle's leave-one-concept-out study the
#: logistic regression held the held-out Omniglot alphabets best (0.953 against 0.920)
#: and the trees held CIFAR-10 best (0.996 against 0.949); their average held both.
SOFT_VOTE_KINDS = ("logistic", "boosted_trees")


@dataclass(frozen=True)
class HeadConfig:
    """Every choice of the service heads; each value is a chosen default."""

    # Candidates for both heads: the paper's L2 logistic regression and small network,
    # scikit-learn's histogram gradient-boosted trees, and the average of the logistic
    # regression's and the trees' probabilities (soft_vote, SOFT_VOTE_KINDS).
    candidates: tuple[str, ...] = ("logistic", "neural_net", "boosted_trees", "soft_vote")
    # p_correct has about a hundred wrong predictions to learn from, so its selection also
    # chooses the input groups (ablations.py names) and a strongly regularized logistic
    # regression is among its kinds; all by cross-validation on calibration digits.
    p_correct_candidates: tuple[str, ...] = (
        "logistic",
        "logistic_strong",
        "boosted_trees",
        "soft_vote",
    )
    p_correct_input_sets: tuple[str, ...] = (
        "all",
        "without_gradient",
        "without_feature_space",
        "only_softmax",
    )
    # Chosen default: L2 strength for ~90 standardized inputs on ~10,000 rows.
    logistic_c: float = 0.1
    logistic_strong_c: float = 0.01
    logistic_max_iter: int = 5_000
    # Chosen defaults: one hidden layer as in the paper, Adam for a fixed number of epochs.
    hidden_units: int = 64
    weight_decay: float = 1e-3
    mlp_max_iter: int = 100
    # Chosen defaults: shallow trees and a strong L2 on leaf values, for transfer to
    # unseen concepts rather than the last digit of the seen ones.
    trees_max_iter: int = 200
    trees_learning_rate: float = 0.05
    trees_max_leaf_nodes: int = 15
    trees_l2: float = 1.0
    # p_ood's selection may choose its input group too (input sets as for p_correct), by
    # leaving one known-unknown concept out at a time, and rank candidates by the mean
    # held-out AUROC or by the worst held-out concept's ("worst_concept", ties: the mean).
    # Chosen defaults: all inputs, the mean. The worst-concept rule over three input sets
    # picked logistic[without_gradient] on the default bundle, which lost 0.025 AUROC on
    # Omniglot Latin and 0.008 on re-framed notMNIST against boosted_trees[all].
    p_ood_input_sets: tuple[str, ...] = ("all",)
    p_ood_selection: str = "mean_concept"
    # Concepts whose training images the p_ood head is fitted on (known unknowns);
    # "synthesized" are outliers made from member-pool digits (outlier exposure).
    known_unknowns: tuple[str, ...] = ("uniform_noise", "cifar10", "omniglot_other", "synthesized")
    # Probability calibration (scikit-learn's CalibratedClassifierCV, "sigmoid" or
    # "isotonic"). Platt's sigmoid for both (chosen default): it is strictly increasing,
    # so a calibrated head ranks images exactly as the head whose ranking the selection
    # measured. Isotonic regression's steps tied the default bundle's p_ood into about
    # 50 values and lost 0.0007 mean held-out-concept AUROC (0.9789 against 0.9796);
    # its ECE on held-out known unknowns was 0.007 against the sigmoid's 0.009.
    # p_correct has about a hundred wrong predictions, too few for a step function.
    p_ood_calibration: str = "sigmoid"
    p_correct_calibration: str = "sigmoid"
    # Chosen default: 3 folds of cross-validated predictions for the calibration map.
    calibration_folds: int = 3
    # False (chosen default): one head fitted on all fitting data, its calibration map
    # fitted on the folds' out-of-fold predictions (scikit-learn's ``ensemble=False``).
    # True keeps one calibrated copy per fold and averages them: the same kind of answer
    # at three times the serving cost (the profile of a batch-1 request spent 96% of
    # its time in the boosted trees' predict).
    calibration_ensemble: bool = False
    # Calibration digits held out of the p_ood head entirely: the is_ood threshold is
    # chosen on them, and the calibration diagnostics use them.
    threshold_holdout: float = 0.2
    # is_ood leaves this fraction of held-out calibration digits unflagged.
    in_distribution_retained: float = 0.95
    # Stratified folds of the p_correct selection (5 keep ~16 wrong predictions a fold).
    selection_folds: int = 5
    # Bins of the expected calibration error and the reliability diagram.
    calibration_bins: int = 10
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_head(kind: str, columns: Sequence[int], config: HeadConfig) -> Pipeline | VotingClassifier:
    """An unfitted head: the chosen input columns, standardized, then the classifier
    (``soft_vote``: one such pipeline per kind of :data:`SOFT_VOTE_KINDS`, averaged)."""
    if kind == "soft_vote":
        return VotingClassifier(
            [(part, make_head(part, columns, config)) for part in SOFT_VOTE_KINDS],
            voting="soft",
        )
    if kind in ("logistic", "logistic_strong"):
        strength = config.logistic_c if kind == "logistic" else config.logistic_strong_c
        model = LogisticRegression(C=strength, max_iter=config.logistic_max_iter)
    elif kind == "neural_net":
        model = MLPClassifier(
            hidden_layer_sizes=(config.hidden_units,),
            alpha=config.weight_decay,
            max_iter=config.mlp_max_iter,
            random_state=config.seed,
        )
    elif kind == "boosted_trees":
        model = HistGradientBoostingClassifier(
            max_iter=config.trees_max_iter,
            learning_rate=config.trees_learning_rate,
            max_leaf_nodes=config.trees_max_leaf_nodes,
            l2_regularization=config.trees_l2,
            early_stopping=False,
            random_state=config.seed,
        )
    else:
        raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
    return Pipeline(
        [
            ("select", ColumnTransformer([("inputs", "passthrough", list(columns))])),
            ("standardize", StandardScaler()),
            ("classifier", model),
        ]
    )


# ------------------------------------------------------------------------ the view


@dataclass
class EnsembleView:
    """What the served computation says about one image set."""

    inputs: np.ndarray  # (N, F) head inputs
    scores: dict[str, np.ndarray]  # served score name -> (N,), confidences
    probabilities: np.ndarray  # (N, 10) members' mean softmax
    labels: np.ndarray | None = None  # (N,) true classes where known

    @property
    def prediction(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: np.ndarray) -> EnsembleView:
        return EnsembleView(
            self.inputs[indices],
            {name: value[indices] for name, value in self.scores.items()},
            self.probabilities[indices],
            None if self.labels is None else self.labels[indices],
        )

    @staticmethod
    def concatenate(parts: Sequence[EnsembleView]) -> EnsembleView:
        return EnsembleView(
            np.concatenate([p.inputs for p in parts]),
            {name: np.concatenate([p.scores[name] for p in parts]) for name in parts[0].scores},
            np.concatenate([p.probabilities for p in parts]),
            None
            if any(p.labels is None for p in parts)
            else np.concatenate([p.labels for p in parts]),
        )


def view_of_output(
    output: EngineOutput, statistics: Sequence[FeatureSpaceStatistics]
) -> EnsembleView:
    """The view of one engine batch: head inputs, served scores, mean softmax."""
    feature_space = feature_space_of(output, statistics)
    return EnsembleView(
        head_inputs(output, feature_space),
        ensemble_scores(output.probabilities, feature_space),
        output.probabilities.astype(np.float64).mean(axis=0),
    )


def ensemble_view(
    engine: ScorerEngine,
    statistics: Sequence[FeatureSpaceStatistics],
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 1_024,
) -> EnsembleView:
    """Head inputs and served scores of uint8 images ``(N, 28, 28)``, batch by batch."""
    parts = [
        view_of_output(engine.run(images[start : start + batch_size]), statistics)
        for start in range(0, len(images), batch_size)
    ]
    view = EnsembleView.concatenate(parts)
    view.labels = None if labels is None else np.asarray(labels)
    return view


def ensemble_view_job(
    engine: ScorerEngine, images: np.ndarray, batch_size: int, statistics
) -> EnsembleView:
    return ensemble_view(engine, statistics, images, None, batch_size)


def ensemble_views(
    graphs: GraphFiles,
    statistics: Sequence[FeatureSpaceStatistics],
    image_sets: dict[str, np.ndarray],
    batch_size: int = 1_024,
    extractor: Extractor | None = None,
) -> dict[str, EnsembleView]:
    """:func:`ensemble_view` of every named set (no labels), in one ``extractor`` call:
    in this process by default, as parallel Ray tasks with a RayExtractor."""
    sets = {name: (graphs, images) for name, images in image_sets.items()}
    return (extractor or LocalExtractor()).map(
        ensemble_view_job, EnsembleView.concatenate, sets, batch_size, statistics=statistics
    )


# ------------------------------------------------------------------ selection, fitting


def _split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    permutation = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * fraction))
    return np.sort(permutation[cut:]), np.sort(permutation[:cut])


def _ood_data(digits: EnsembleView, unknowns: dict[str, EnsembleView], concepts: Sequence[str]):
    """Rows and labels (1 = in-distribution) of digits plus the named known unknowns."""
    parts = [digits.inputs, *[unknowns[c].inputs for c in concepts]]
    labels = np.concatenate([np.ones(len(digits)), *[np.zeros(len(unknowns[c])) for c in concepts]])
    return np.concatenate(parts), labels


def _positive(estimator, inputs: np.ndarray) -> np.ndarray:
    return estimator.predict_proba(inputs)[:, 1]


def select_head(
    kind_of: str,
    digits: EnsembleView,
    unknowns: dict[str, EnsembleView],
    columns: Sequence[int],
    config: HeadConfig,
) -> dict:
    """Choose a head kind by cross-validation; never on test data.

    ``kind_of="p_ood"``: leave one known-unknown concept out at a time; fit on two thirds
    of the digits plus the other concepts, score the held-out third of the digits against
    the held-out concept; the kind with the best mean AUROC over held-out concepts wins.
    ``kind_of="p_correct"``: stratified folds of the digits, correct vs wrong.
    """
    results: dict[str, dict] = {}
    correct = (digits.prediction == digits.labels).astype(int)
    if kind_of == "p_correct":
        folds = StratifiedKFold(config.selection_folds, shuffle=True, random_state=config.seed)
        for kind in config.p_correct_candidates:
            for input_set in config.p_correct_input_sets:
                chosen_columns = input_set_columns(input_set)
                aurocs = []
                for train, test in folds.split(digits.inputs, correct):
                    head = make_head(kind, chosen_columns, config)
                    head.fit(digits.inputs[train], correct[train])
                    aurocs.append(
                        roc_auc_score(correct[test], _positive(head, digits.inputs[test]))
                    )
                results[f"{kind}[{input_set}]"] = {
                    "kind": kind,
                    "input_set": input_set,
                    "mean_auroc": float(np.mean(aurocs)),
                    "fold_auroc": aurocs,
                }
        chosen = max(results, key=lambda name: results[name]["mean_auroc"])
        return {
            "chosen": chosen,
            "kind": results[chosen]["kind"],
            "input_set": results[chosen]["input_set"],
            "rule": f"highest mean {config.selection_folds}-fold stratified AUROC, correct vs "
            "wrong, on calibration digits, over head kinds and input groups",
            "candidates": results,
        }
    if kind_of != "p_ood":
        raise ValueError(f"kind_of must be 'p_ood' or 'p_correct', got {kind_of!r}")
    if config.p_ood_selection not in _CONCEPT_RULES:
        raise ValueError(
            f"p_ood_selection must be one of {sorted(_CONCEPT_RULES)}, "
            f"got {config.p_ood_selection!r}"
        )
    fit_rows, held_rows = _split(len(digits), 1 / 3, config.seed)
    for kind in config.candidates:
        for input_set in config.p_ood_input_sets:
            chosen_columns = sorted(set(columns) & set(input_set_columns(input_set)))
            per_concept = {}
            for held_out in config.known_unknowns:
                others = [c for c in config.known_unknowns if c != held_out]
                x, y = _ood_data(digits.subset(fit_rows), unknowns, others)
                head = make_head(kind, chosen_columns, config).fit(x, y)
                test_x, test_y = _ood_data(digits.subset(held_rows), unknowns, [held_out])
                per_concept[held_out] = float(roc_auc_score(test_y, _positive(head, test_x)))
            results[f"{kind}[{input_set}]"] = {
                "kind": kind,
                "input_set": input_set,
                "worst_auroc": min(per_concept.values()),
                "mean_auroc": float(np.mean(list(per_concept.values()))),
                "held_out_concept_auroc": per_concept,
            }
    rank = _CONCEPT_RULES[config.p_ood_selection]
    chosen = max(results, key=lambda name: rank(results[name]))
    worst = "lowest" if config.p_ood_selection == "worst_concept" else "mean"
    return {
        "chosen": chosen,
        "kind": results[chosen]["kind"],
        "input_set": results[chosen]["input_set"],
        "rule": f"highest {worst} AUROC over held-out known-unknown concepts (leave one "
        "concept out; fitted on 2/3 of the fitting digits plus the other concepts; the "
        "held-out third of the digits against the held-out concept), over head kinds and "
        "input groups",
        "candidates": results,
    }


#: Orderings of p_ood candidates: the worst held-out concept first (ties: the mean), or
#: the mean alone.
_CONCEPT_RULES: dict[str, Callable[[dict], tuple[float, ...]]] = {
    "worst_concept": lambda result: (result["worst_auroc"], result["mean_auroc"]),
    "mean_concept": lambda result: (result["mean_auroc"],),
}


def fit_calibrated(kind: str, columns, x, y, method: str, config: HeadConfig):
    """A head of ``kind`` with its probabilities calibrated by cross-fitting."""
    folds = StratifiedKFold(config.calibration_folds, shuffle=True, random_state=config.seed)
    calibrated = CalibratedClassifierCV(
        make_head(kind, columns, config),
        method=method,
        cv=folds,
        ensemble=config.calibration_ensemble,
    )
    return calibrated.fit(x, y)


def fit_heads(
    calibration: EnsembleView,
    unknowns: dict[str, EnsembleView],
    config: HeadConfig,
    columns: Sequence[int] | None = None,
    p_ood_kind: str | None = None,
    p_correct_kind: str | None = None,
    p_correct_columns: Sequence[int] | None = None,
    p_ood_columns: Sequence[int] | None = None,
) -> tuple[Heads, dict]:
    """Fit, calibrate and threshold both heads; choose their kinds unless given.

    ``columns`` are the head inputs of both heads (all by default); each head's own input
    group is chosen with its kind unless its kind is given (then ``p_correct_columns`` and
    ``p_ood_columns`` name its inputs, ``columns`` by default).
    """
    from scoring.answer import head_input_names

    names = head_input_names()
    columns = list(range(len(names))) if columns is None else list(columns)
    fit_rows, threshold_rows = _split(len(calibration), config.threshold_holdout, config.seed + 1)
    fitting_digits = calibration.subset(fit_rows)
    selection = {}
    if p_ood_kind is None:
        selection["p_ood"] = select_head("p_ood", fitting_digits, unknowns, columns, config)
        p_ood_kind = selection["p_ood"]["kind"]
        p_ood_columns = sorted(
            set(columns) & set(input_set_columns(selection["p_ood"]["input_set"]))
        )
    if p_ood_columns is None:
        p_ood_columns = columns
    if p_correct_kind is None:
        selection["p_correct"] = select_head("p_correct", calibration, unknowns, columns, config)
        p_correct_kind = selection["p_correct"]["kind"]
        p_correct_columns = input_set_columns(selection["p_correct"]["input_set"])
    if p_correct_columns is None:
        p_correct_columns = columns

    x, y = _ood_data(fitting_digits, unknowns, config.known_unknowns)
    p_ood = fit_calibrated(p_ood_kind, p_ood_columns, x, y, config.p_ood_calibration, config)
    correct = (calibration.prediction == calibration.labels).astype(int)
    p_correct = fit_calibrated(
        p_correct_kind,
        p_correct_columns,
        calibration.inputs,
        correct,
        config.p_correct_calibration,
        config,
    )
    held_out = 1.0 - _positive(p_ood, calibration.inputs[threshold_rows])
    threshold = float(np.quantile(held_out, config.in_distribution_retained, method="higher"))
    heads = Heads(p_correct=p_correct, p_ood=p_ood, ood_threshold=threshold, input_names=names)
    info = {
        "kinds": {"p_ood": p_ood_kind, "p_correct": p_correct_kind},
        "p_correct_inputs": [names[i] for i in p_correct_columns],
        "p_correct_set": selection.get("p_correct", {}).get("input_set", "all"),
        "p_ood_inputs": [names[i] for i in p_ood_columns],
        "p_ood_set": selection.get("p_ood", {}).get("input_set", "all"),
        "selection": selection,
        "threshold": {
            "value": threshold,
            "rule": f"is_ood = p_ood >= value; value is the {config.in_distribution_retained:.0%} "
            f"quantile of p_ood on {len(threshold_rows)} calibration digits that no head was "
            "fitted on",
            "held_out_digits": len(threshold_rows),
        },
    }
    return heads, info


# ------------------------------------------------------------------------ evaluation


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    """ECE: the bin-weighted mean |accuracy - confidence| over equal-width bins."""
    probability, outcome = np.asarray(probability), np.asarray(outcome, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(outcome[members].mean() - probability[members].mean())
    return float(error)


def calibration_summary(probability: np.ndarray, outcome: np.ndarray, bins: int) -> dict:
    """ECE, Brier score and the reliability diagram's points of one probability."""
    observed, predicted = calibration_curve(outcome, probability, n_bins=bins, strategy="uniform")
    return {
        "ece": expected_calibration_error(probability, outcome, bins),
        "brier": float(brier_score_loss(outcome, probability)),
        "count": int(len(outcome)),
        "positive_rate": float(np.mean(outcome)),
        "reliability": {"predicted": predicted.tolist(), "observed": observed.tolist()},
    }


@dataclass
class ServiceLevelResult:
    heads: Heads
    info: dict
    records: list[dict] = field(default_factory=list)
    ablations: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    seen_concepts: list[str] = field(default_factory=list)
    reference: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {
            "records": self.records,
            "ablations": self.ablations,
            "calibration": self.calibration,
            "seen_concepts": self.seen_concepts,
            "heads": self.info,
            "score_descriptions": SCORE_DESCRIPTIONS,
        }


def _comparisons(test: EnsembleView, concepts: dict[str, EnsembleView]):
    """(concept, view, positive) for correct vs wrong and for every concept vs test digits."""
    correct = test.prediction == test.labels
    yield CORRECT_VS_WRONG, test, correct
    for concept, view in concepts.items():
        both = EnsembleView.concatenate([test, dataclasses.replace(view, labels=None)])
        positive = np.concatenate([np.ones(len(test), bool), np.zeros(len(view), bool)])
        yield concept, both, positive


def _single_scores(calibration: EnsembleView, unknowns, config: HeadConfig) -> dict:
    """Every head input as a single score, its direction fixed on calibration data.

    Two directions per input: correct vs wrong (for the correct-vs-wrong comparison) and
    digits vs known unknowns (for the concepts), each the sign of its AUROC minus 0.5.
    """
    from scoring.answer import head_input_names

    correct = (calibration.prediction == calibration.labels).astype(int)
    x, y = _ood_data(calibration, unknowns, config.known_unknowns)
    directions = {}
    for index, name in enumerate(head_input_names()):
        in_digits = roc_auc_score(correct, calibration.inputs[:, index])
        ood = roc_auc_score(y, x[:, index])
        directions[name] = (index, 1 if in_digits >= 0.5 else -1, 1 if ood >= 0.5 else -1)
    return directions


def evaluate(
    heads: Heads,
    ablation_heads: dict[str, Heads],
    calibration: EnsembleView,
    test: EnsembleView,
    concepts: dict[str, EnsembleView],
    unknowns: dict[str, EnsembleView],
    config: HeadConfig,
) -> tuple[list[dict], list[dict]]:
    """Records for served heads, every served score and every single input, per concept."""
    directions = _single_scores(calibration, unknowns, config)
    records, ablations = [], []

    def add(kind: str, score: str, concept: str, confidence, positive, target: list) -> None:
        values = threshold_metrics(np.asarray(confidence, dtype=np.float64), positive)
        target.append({"kind": kind, "score": score, "concept": concept, **values})

    for concept, view, positive in _comparisons(test, concepts):
        p_correct, p_ood = apply_heads(heads, view.inputs)
        head_score = ("p_correct", p_correct) if concept == CORRECT_VS_WRONG else ("p_ood", -p_ood)
        add("head", head_score[0], concept, head_score[1], positive, records)
        if concept == CORRECT_VS_WRONG:
            add("head", "p_ood", concept, -p_ood, positive, records)
        else:
            add("head", "p_correct", concept, p_correct, positive, records)
        for name, values in view.scores.items():
            add("score", name, concept, values, positive, records)
        for name, (index, in_digits, ood) in directions.items():
            sign = in_digits if concept == CORRECT_VS_WRONG else ood
            add("single", name, concept, sign * view.inputs[:, index], positive, records)
        for ablation, ablated in ablation_heads.items():
            a_correct, a_ood = apply_heads(ablated, view.inputs)
            confidence = a_correct if concept == CORRECT_VS_WRONG else -a_ood
            name = "p_correct" if concept == CORRECT_VS_WRONG else "p_ood"
            add(ablation, name, concept, confidence, positive, ablations)
    return records, ablations


ABLATIONS: dict[str, str] = {
    "without_gradient": "gradient",
    "without_feature_space": "feature_space",
    "without_ensemble": "ensemble",
    "only_softmax": "",
}


def input_set_columns(input_set: str) -> list[int]:
    """Columns of a named input group: ``all`` or one of :data:`ABLATIONS`."""
    if input_set == "all":
        return list(range(len(HEAD_INPUT_GROUPS)))
    if input_set not in ABLATIONS:
        raise ValueError(f"input set must be 'all' or one of {list(ABLATIONS)}, got {input_set!r}")
    return ablation_columns(input_set)


def ablation_columns(ablation: str) -> list[int]:
    """Head-input columns left when one group is dropped (``only_softmax``: softmax alone)."""
    names = list(HEAD_INPUT_GROUPS)
    if ablation == "only_softmax":
        return [i for i, n in enumerate(names) if HEAD_INPUT_GROUPS[n] == "softmax"]
    dropped = ABLATIONS[ablation]
    return [i for i, n in enumerate(names) if HEAD_INPUT_GROUPS[n] != dropped]


def _ablated(ablation: str, input_set: str) -> list[int]:
    """A head's chosen input group less the ablated one (the ablation's own columns where
    nothing would be left)."""
    kept = sorted(set(ablation_columns(ablation)) & set(input_set_columns(input_set)))
    return kept or ablation_columns(ablation)


def run_service_level(
    calibration: EnsembleView,
    test: EnsembleView,
    concepts: dict[str, EnsembleView],
    unknowns: dict[str, EnsembleView],
    unknowns_held_out: dict[str, EnsembleView],
    config: HeadConfig,
    log: Callable[[str], None] = print,
) -> ServiceLevelResult:
    """Fit the served heads and the ablations, evaluate everything on test data."""
    log("service heads: selecting and fitting")
    heads, info = fit_heads(calibration, unknowns, config)
    ablation_heads = {}
    for ablation in ABLATIONS:
        log(f"service heads: ablation {ablation}")
        ablation_heads[ablation], _ = fit_heads(
            calibration,
            unknowns,
            config,
            columns=ablation_columns(ablation),
            p_ood_kind=info["kinds"]["p_ood"],
            p_correct_kind=info["kinds"]["p_correct"],
            p_correct_columns=_ablated(ablation, info["p_correct_set"]),
            p_ood_columns=_ablated(ablation, info["p_ood_set"]),
        )
    log("service heads: evaluating on the test split and every concept")
    records, ablations = evaluate(
        heads, ablation_heads, calibration, test, concepts, unknowns, config
    )

    # Calibration on held-out data: p_correct on test digits (correct vs wrong); p_ood on
    # test digits plus the held-out parts of the known-unknown concepts, mixed in the
    # proportions the head was fitted on.
    p_correct, p_ood = apply_heads(heads, test.inputs)
    correct = (test.prediction == test.labels).astype(float)
    mixture = [test]
    rng = np.random.default_rng(config.seed)
    for concept in config.known_unknowns:
        share = len(unknowns[concept]) / int(
            round(len(calibration) * (1 - config.threshold_holdout))
        )
        take = min(len(unknowns_held_out[concept]), int(round(share * len(test))))
        rows = np.sort(rng.choice(len(unknowns_held_out[concept]), size=take, replace=False))
        mixture.append(dataclasses.replace(unknowns_held_out[concept].subset(rows), labels=None))
    mixed = EnsembleView.concatenate([dataclasses.replace(v, labels=None) for v in mixture])
    is_ood = np.concatenate([np.zeros(len(test)), np.ones(len(mixed) - len(test))])
    _, mixed_p_ood = apply_heads(heads, mixed.inputs)
    bins = config.calibration_bins
    calibration_report = {
        "p_correct": {
            **calibration_summary(p_correct, correct, bins),
            "data": "official test digits, outcome = prediction correct",
        },
        "p_ood": {
            **calibration_summary(mixed_p_ood, is_ood, bins),
            "data": "official test digits plus held-out images of the known-unknown concepts, "
            "in the proportions of the fitting data",
        },
    }
    for ablation, ablated in ablation_heads.items():
        a_correct, _ = apply_heads(ablated, test.inputs)
        _, a_ood = apply_heads(ablated, mixed.inputs)
        calibration_report[f"{ablation}:p_correct"] = {
            "ece": expected_calibration_error(a_correct, correct, bins)
        }
        calibration_report[f"{ablation}:p_ood"] = {
            "ece": expected_calibration_error(a_ood, is_ood, bins)
        }

    cal_correct, cal_ood = apply_heads(heads, calibration.inputs)
    reference = {
        "p_ood": [round(float(v), 6) for v in cal_ood],
        "p_correct": [round(float(v), 6) for v in cal_correct],
        "softmax_baseline": [round(float(v), 6) for v in calibration.scores["softmax_baseline"]],
    }
    seen = [*config.known_unknowns]
    return ServiceLevelResult(
        heads=heads,
        info=info,
        records=records,
        ablations=ablations,
        calibration=calibration_report,
        seen_concepts=seen,
        reference=reference,
    )
