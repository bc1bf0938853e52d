"""Task metrics against scikit-learn and SciPy."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from jaxkd import metrics


@pytest.fixture
def pairs():
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, 200), rng.integers(0, 2, 200)


def test_classification_metrics_match_sklearn(pairs):
    pred, label = pairs
    assert metrics.accuracy(pred, label) == pytest.approx(skm.accuracy_score(label, pred))
    assert metrics.f1(pred, label) == pytest.approx(skm.f1_score(label, pred))
    assert metrics.matthews(pred, label) == pytest.approx(skm.matthews_corrcoef(label, pred))


def test_matthews_of_several_classes_matches_sklearn():
    rng = np.random.default_rng(2)
    pred, label = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    label[:100] = pred[:100]  # some agreement
    assert metrics.matthews(pred, label) == pytest.approx(skm.matthews_corrcoef(label, pred))
    assert metrics.matthews(np.array([0, 1, 2, 2, 0, 1, 2, 0]), np.array([0, 1, 2, 1, 0, 2, 2, 0])) \
        == pytest.approx(skm.matthews_corrcoef([0, 1, 2, 1, 0, 2, 2, 0], [0, 1, 2, 2, 0, 1, 2, 0]))
    assert metrics.matthews(np.zeros(5, int), np.zeros(5, int)) == 0.0  # undefined: 0


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    pred = np.round(rng.normal(size=300), 1)  # rounding makes ties
    label = pred + rng.normal(size=300)
    assert metrics.pearson(pred, label) == pytest.approx(stats.pearsonr(pred, label)[0])
    assert metrics.spearman(pred, label) == pytest.approx(stats.spearmanr(pred, label)[0])


def test_compute_takes_argmax_or_regression_value():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert metrics.compute(["accuracy"], logits, np.array([1, 0, 0])) == {"accuracy": pytest.approx(2 / 3)}
    reg = metrics.compute(["pearson"], np.array([[1.0], [2.0], [3.0]]), np.array([2.0, 4.0, 6.5]))
    assert reg["pearson"] == pytest.approx(stats.pearsonr([1, 2, 3], [2, 4, 6.5])[0])
    teacher = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # always class 0
    assert metrics.agreement(logits, teacher) == pytest.approx(1 / 3)
