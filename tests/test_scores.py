"""Every served score against a trusted implementation, on real images through a real graph.

Oracles: scikit-learn's covariance and nearest-neighbour estimators, scipy, and
pytorch-ood's detectors (installed without its dependencies: its package import pulls
torchvision, so only its detector modules are loaded, see ``pytorch_ood_detector``).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import entropy as scipy_entropy
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors

from scoring.engine import ScorerEngine
from scoring.scores import (
    FeatureSpaceConfig,
    MahalanobisForm,
    disagreement,
    energy,
    ensemble_scores,
    knn_distance,
    mahalanobis_distance,
    max_logit,
    member_scores,
    mutual_information,
    predictive_entropy,
    vim_virtual_logit,
)

torch = pytest.importorskip("torch", reason="the oracles and the fitting need torch")

from training.feature_space import fit_feature_space  # noqa: E402
from training.train import load_member  # noqa: E402


def pytorch_ood_detector(name: str):
    """``pytorch_ood.detector.<name>`` without running the package's ``__init__``."""
    loaded = sys.modules.get("pytorch_ood")
    if loaded is not None and hasattr(loaded, "__path__"):
        root = loaded.__path__[0]  # an earlier call's package (find_spec refuses it: no spec)
    else:
        spec = importlib.util.find_spec("pytorch_ood")
        if spec is None:
            pytest.skip("pytorch-ood is not installed (pip install --no-deps pytorch-ood)")
        root = spec.submodule_search_locations[0]
    for package, path in (("pytorch_ood", root), ("pytorch_ood.detector", f"{root}/detector")):
        if package not in sys.modules or not hasattr(sys.modules[package], "__path__"):
            module = types.ModuleType(package)
            module.__path__ = [path]
            sys.modules[package] = module
    return importlib.import_module(f"pytorch_ood.detector.{name}")


@pytest.fixture(scope="module")
def member_features(bundle_dir, data_dir):
    """Member 0 of the bundle: penultimate features, channel statistics and logits of real
    train, test and notMNIST images from its own scorer graph, and its fitted statistics."""
    from training.data.mnist import load_mnist
    from training.data.sources import load_source

    model, _ = load_member(bundle_dir / "weights", 0)
    engine = ScorerEngine([bundle_dir / "graphs" / "member_0.onnx"])
    train = load_mnist(data_dir, "train")
    test = load_mnist(data_dir, "test")
    letters = load_source("notmnist", data_dir, seed=0, count=300)
    rows = np.random.default_rng(0).permutation(len(train))[:3000]
    fit = engine.run(train.images[rows])
    queries = engine.run(np.concatenate([test.images[:300], letters.images]))
    config = FeatureSpaceConfig(knn_bank_size=1000, knn_k=10, vim_dimension=512)
    statistics = fit_feature_space(
        fit.penultimate[0],
        fit.logits[0],
        fit.channel_statistics[0],
        train.labels[rows],
        model.dense.weight.detach().numpy(),
        model.dense.bias.detach().numpy(),
        config,
    )
    return {
        "model": model,
        "fit": fit.penultimate[0].astype(np.float64),
        "fit_logits": fit.logits[0],
        "fit_labels": train.labels[rows],
        "queries": queries.penultimate[0].astype(np.float64),
        "query_logits": queries.logits[0],
        "fit_channels": fit.channel_statistics[0].astype(np.float64),
        "query_channels": queries.channel_statistics[0].astype(np.float64),
        "query_images": np.concatenate([test.images[:300], letters.images]),
        "statistics": statistics,
        "config": config,
    }


@pytest.mark.parametrize(
    ("fit", "queries", "means", "precision", "tolerance"),
    [
        # float32 precision of 784 penultimate features
        ("fit", "queries", "class_means", "precision", 1e-3),
        # float64 precision of the 64 channel statistics
        ("fit_channels", "query_channels", "channel_means", "channel_precision", 1e-6),
    ],
)
def test_mahalanobis_equals_scikit_learn_ledoit_wolf(
    member_features, fit, queries, means, precision, tolerance
):
    """Both Mahalanobis scores against scikit-learn's Ledoit-Wolf covariance."""
    h, labels = member_features[fit], member_features["fit_labels"]
    centers = np.stack([h[labels == c].mean(axis=0) for c in range(10)])
    oracle = LedoitWolf(assume_centered=True).fit(h - centers[labels])
    queries = member_features[queries]
    expected = np.min([oracle.mahalanobis(queries - centers[c]) for c in range(10)], axis=0)
    statistics = member_features["statistics"]
    actual = mahalanobis_distance(
        queries, getattr(statistics, means), getattr(statistics, precision)
    )
    np.testing.assert_allclose(actual, expected, rtol=tolerance)
    # OOD letters lie farther from every class than test digits do.
    assert np.median(actual[300:]) > 2 * np.median(actual[:300])


def test_the_graphs_channel_statistics_equal_numpy_on_the_torch_activations(member_features):
    """Each channel's mean and population standard deviation over the pixels of the
    pooled conv1 (14x14) and conv2 (7x7) activations, recomputed from the network's own
    torch layers in float64 and reduced by numpy."""
    model = copy.deepcopy(member_features["model"]).double().eval()
    images = torch.from_numpy(member_features["query_images"]).double()[:, None] / 255.0
    slope = model.config.leaky_relu_slope
    double = model.layers()
    with torch.no_grad():
        pooled1 = torch.nn.functional.max_pool2d(
            torch.nn.functional.leaky_relu(double["conv1"](images), slope), 2
        )  # (B, 16, 14, 14)
        pooled2 = torch.nn.functional.max_pool2d(
            torch.nn.functional.leaky_relu(double["conv2"](pooled1), slope), 2
        )  # (B, 16, 7, 7)
    expected = np.concatenate(
        [
            part
            for block in (pooled1.numpy(), pooled2.numpy())
            for part in (block.mean(axis=(2, 3)), block.std(axis=(2, 3)))
        ],
        axis=1,
    )  # (B, 64)
    np.testing.assert_allclose(member_features["query_channels"], expected, rtol=1e-4, atol=1e-5)


def test_the_served_mahalanobis_form_equals_the_definition_at_every_batch_size(
    member_features,
):
    """The triangular factor (batch 1: dtrmv, larger: dtrmm) and the eigen fallback of
    a precision that is not positive definite give ``min_c (h-mu_c)^T P (h-mu_c)``."""
    statistics = member_features["statistics"]
    queries = member_features["queries"][:40].astype(np.float64)
    means = statistics.class_means.astype(np.float64)
    precision = statistics.precision.astype(np.float64)

    def definition(precision: np.ndarray) -> np.ndarray:
        centered = queries[:, None, :] - means[None]  # (B, C, D)
        return np.einsum("bcd,de,bce->bc", centered, precision, centered).min(axis=1)

    form = MahalanobisForm.of(means, precision)
    assert form.triangular
    batch = mahalanobis_distance(queries, means, precision, form)
    singles = np.concatenate(
        [mahalanobis_distance(q[None], means, precision, form) for q in queries]
    )
    np.testing.assert_allclose(batch, definition(precision), rtol=1e-9)
    np.testing.assert_allclose(singles, batch, rtol=1e-9)
    # One eigenvalue pushed below zero: no Cholesky factor; the clipped square root.
    values, vectors = np.linalg.eigh(precision)
    values[0] = -1.0
    indefinite = (vectors * values) @ vectors.T
    fallback = MahalanobisForm.of(means, indefinite)
    assert not fallback.triangular
    values[0] = 0.0
    np.testing.assert_allclose(
        mahalanobis_distance(queries, means, indefinite, fallback),
        definition((vectors * values) @ vectors.T),
        rtol=1e-9,
    )


def test_knn_equals_scikit_learn_nearest_neighbours_and_pytorch_ood(member_features):
    statistics = member_features["statistics"]
    bank = statistics.knn_bank.astype(np.float64)
    queries = member_features["queries"]
    normalized = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    distances, _ = NearestNeighbors(n_neighbors=statistics.knn_k).fit(bank).kneighbors(normalized)
    actual = knn_distance(queries, bank, statistics.knn_k)
    # float32 products (knn_distance's docstring) against scikit-learn's float64.
    np.testing.assert_allclose(actual, distances[:, -1], rtol=1e-5, atol=1e-6)

    knn = pytorch_ood_detector("knn")
    detector = knn.KNN(None, k=statistics.knn_k).fit_features(
        torch.from_numpy(bank), torch.zeros(len(bank), dtype=torch.long)
    )
    outlier = detector.predict_features(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(actual, outlier, rtol=1e-4, atol=1e-6)  # pytorch-ood: float32


def test_vim_equals_a_truncated_svd_and_ranks_like_pytorch_ood(member_features):
    """ViM's residual against scikit-learn's exact (ARPACK) truncated SVD in float64, and
    its ranking against pytorch-ood's ViM, which runs in float32: on these features (a
    covariance with condition number near 6e12) float32 cannot place the boundary of the
    principal subspace, so only the detection it gives is compared, not the values."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics import roc_auc_score

    model = member_features["model"]
    statistics = member_features["statistics"]
    dimension = member_features["config"].vim_dimension
    weight = model.dense.weight.detach().double().numpy()
    bias = model.dense.bias.detach().double().numpy()
    origin = -np.linalg.pinv(weight) @ bias
    fit, queries = member_features["fit"], member_features["queries"]
    svd = TruncatedSVD(n_components=dimension, algorithm="arpack", random_state=0)
    svd.fit(fit - origin)

    def residual(h):
        centered = h - origin
        return np.linalg.norm(centered - (centered @ svd.components_.T) @ svd.components_, axis=1)

    alpha = (fit @ weight.T + bias).max(axis=1).mean() / residual(fit).mean()
    logits = queries @ weight.T + bias
    expected = energy(logits) - alpha * residual(queries)
    ours = energy(logits) - vim_virtual_logit(
        queries, statistics.vim_origin, statistics.vim_null_space, statistics.vim_alpha
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)

    vim = pytorch_ood_detector("vim")
    detector = vim.ViM(None, d=dimension, w=torch.from_numpy(weight), b=torch.from_numpy(bias))
    detector.fit_features(torch.from_numpy(fit), torch.from_numpy(member_features["fit_labels"]))
    outlier = detector.predict_features(torch.from_numpy(queries)).numpy().astype(np.float64)
    is_digit = np.r_[np.ones(300), np.zeros(len(queries) - 300)]
    assert roc_auc_score(is_digit, ours) == pytest.approx(
        roc_auc_score(is_digit, -outlier), abs=0.02
    )
    assert ours[:300].mean() > ours[300:].mean()


def test_softmax_and_ensemble_scores_equal_scipy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 64, 10)) * 3
    probabilities = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
    mean = probabilities.mean(axis=0)
    np.testing.assert_allclose(predictive_entropy(probabilities), scipy_entropy(mean, axis=1))
    member_entropy = scipy_entropy(probabilities, axis=2).mean(axis=0)
    np.testing.assert_allclose(
        mutual_information(probabilities), scipy_entropy(mean, axis=1) - member_entropy, atol=1e-12
    )
    votes = probabilities.argmax(axis=2) != mean.argmax(axis=1)
    np.testing.assert_allclose(disagreement(probabilities), votes.mean(axis=0))
    np.testing.assert_allclose(energy(logits[0]), logsumexp(logits[0], axis=1))
    np.testing.assert_allclose(max_logit(logits[0]), logits[0].max(axis=1))


def test_served_scores_are_confidences_larger_for_digits(member_features):
    """Every served score ranks real test digits above notMNIST letters on average."""
    statistics = member_features["statistics"]
    penultimate = member_features["queries"][None]
    logits = member_features["query_logits"][None]
    channels = member_features["query_channels"][None]
    probabilities = np.exp(logits - logsumexp(logits, axis=2, keepdims=True))
    scores = ensemble_scores(
        probabilities, member_scores(logits, penultimate, channels, [statistics])
    )
    assert "channel_mahalanobis" in scores
    for name, values in scores.items():
        if name in ("mutual_information", "disagreement"):
            continue  # zero for a single member
        assert values[:300].mean() > values[300:].mean(), name


def test_member_scores_run_blas_on_one_thread_and_restore_the_limit(member_features, monkeypatch):
    """With two BLAS threads OpenBLAS's second one spun between calls and starved the event
    loop (16 clients on 2 cores: 92 against 299 requests/s), so the feature-space scores
    run on one, whatever the batch; the caller's own limit is back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import scoring.scores as scores_module

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy reports no BLAS thread pool here")
    seen: list[set[int]] = []
    real = scores_module.member_feature_space_scores

    def observed(*args, **kwargs):
        seen.append(blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(scores_module, "member_feature_space_scores", observed)
    rows = slice(0, 64)
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        member_scores(
            member_features["query_logits"][None, rows],
            member_features["queries"][None, rows],
            member_features["query_channels"][None, rows],
            [member_features["statistics"]],
        )
        after = blas_threads()
    assert seen == [{1}]
    assert after == before
