"""GLUE metrics computed with scikit-learn/scipy (same definitions as `evaluate`'s `glue` metric,
which cannot be loaded offline because it fetches its code from the Hub)."""
from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(accuracy_score(labels, preds))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    return float(f1_score(labels, preds))


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(matthews_corrcoef(labels, preds))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(pearsonr(preds, labels)[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(spearmanr(preds, labels)[0])


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute(names: list[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute the named GLUE metrics. `preds` are class ids (classification) or scores (regression)."""
    return {name: METRICS[name](np.asarray(preds), np.asarray(labels)) for name in names}
