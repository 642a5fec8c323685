"""Meta classifiers: the estimator contract, orientation, pickling without torch."""

from __future__ import annotations

import re
import subprocess
import sys

import joblib
import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from training.evaluation.meta import (
    META_CLASSIFIER_NAMES,
    MetaConfig,
    fit_meta_classifier,
    make_meta_classifier,
    positive_probability,
)
from training.evaluation.metrics import auroc


def separable_features(size: int = 1_500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """37 heavy-tailed features; label 1 (correct) where the first feature is small.

    The first column plays the entropy: nonnegative, like the real one.
    """
    rng = np.random.default_rng(seed)
    features = rng.standard_t(3, size=(size, 37)) * np.logspace(-3, 3, 37)
    features[:, 0] = np.abs(features[:, 0])
    labels = (features[:, 0] / 1e-3 + rng.normal(scale=0.5, size=size) < 1.0).astype(int)
    return features, labels


@pytest.mark.parametrize("name", META_CLASSIFIER_NAMES)
def test_fit_predict_proba_oriented_towards_label_one(name):
    features, labels = separable_features()
    model = fit_meta_classifier(name, features, labels, seed=0)
    assert isinstance(model, Pipeline)
    assert list(model.classes_) == [0, 1]
    probabilities = model.predict_proba(features[:10])
    assert probabilities.shape == (10, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    test_features, test_labels = separable_features(seed=1)
    # p(label 1) is the confidence: larger for the positive class on new data
    assert auroc(positive_probability(model, test_features), test_labels) > 0.85


def test_hyperparameters_come_from_the_config():
    config = MetaConfig(lasso_c=0.3, hidden_units=7, weight_decay=0.02, elastic_net_l1_ratio=0.4)
    lasso = make_meta_classifier("lasso", config).named_steps["classifier"]
    assert (lasso.C, lasso.l1_ratio, lasso.solver) == (0.3, 1.0, "liblinear")
    glm = make_meta_classifier("glm", config).named_steps["classifier"]
    assert np.isinf(glm.C)
    ridge = make_meta_classifier("ridge", config).named_steps["classifier"]
    assert ridge.l1_ratio == 0.0
    net = make_meta_classifier("neural_net", config).named_steps["classifier"]
    assert (net.hidden_layer_sizes, net.alpha, net.activation) == ((7,), 0.02, "relu")
    elastic = make_meta_classifier("elastic_net", config).named_steps["classifier"]
    assert (elastic.l1_ratio, elastic.solver) == (0.4, "saga")


def test_unknown_name_and_bad_labels_are_named():
    with pytest.raises(ValueError, match=re.escape("must be one of ['glm', 'lasso'")):
        make_meta_classifier("svm")
    features, _ = separable_features(size=20)
    with pytest.raises(ValueError, match=re.escape("must contain both classes 0 and 1, got [1]")):
        fit_meta_classifier("ridge", features, np.ones(20))
    with pytest.raises(ValueError, match=re.escape("'labels' has 3 entries for 20 feature rows")):
        fit_meta_classifier("ridge", features, [0, 1, 0])


def test_joblib_round_trip_loads_without_torch_or_the_pipeline(tmp_path):
    features, labels = separable_features(size=400)
    models = {name: fit_meta_classifier(name, features, labels) for name in META_CLASSIFIER_NAMES}
    path = tmp_path / "heads.joblib"
    joblib.dump(models, path)
    np.save(tmp_path / "features.npy", features[:8])
    expected = {name: model.predict_proba(features[:8]) for name, model in models.items()}
    np.savez(tmp_path / "expected.npz", **expected)
    # a fresh interpreter in which importing torch or the training pipeline fails, as in
    # the service (which has the scoring package)
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "training"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import joblib, numpy as np
models = joblib.load({str(path)!r})
features = np.load({str(tmp_path / "features.npy")!r})
expected = np.load({str(tmp_path / "expected.npz")!r})
for name, model in models.items():
    np.testing.assert_array_equal(model.predict_proba(features), expected[name])
assert "torch" not in sys.modules
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_meta_classifiers_ignore_the_structurally_zero_features():
    """mean@dense is float32 rounding noise; its value must not move any meta classifier."""
    from scoring.features import STRUCTURALLY_ZERO_FEATURES, feature_names

    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, len(feature_names())))
    labels = (features[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(int)
    noise_column = feature_names().index(STRUCTURALLY_ZERO_FEATURES[0])
    features[:, noise_column] = rng.normal(scale=1e-9, size=400)
    for name in ("glm", "ridge"):
        model = make_meta_classifier(name).fit(features, labels)
        moved = features.copy()
        moved[:, noise_column] = rng.normal(scale=1e-9, size=400)
        np.testing.assert_array_equal(model.predict_proba(features), model.predict_proba(moved))
