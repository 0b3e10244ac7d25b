"""Every metric a record holds, with its direction: the GLUE metrics, computed with scikit-learn/scipy (same
definitions as `evaluate`'s `glue` metric, which cannot be loaded offline because it fetches its code from the Hub),
and the losses and rates the evaluation adds. Tables, claims and regression verdicts read a metric's direction
from `HIGHER_IS_BETTER` (a record carries it too), never from its name."""
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


# Whether a larger value is better, for every metric a record can hold (`metrics`, `zero_shot_metrics`, ...).
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1": True,
    "matthews_correlation": True,
    "pearson": True,
    "spearmanr": True,
    "eval_loss": False,  # mean loss on the dev set (nats)
    "no_answer_fraction": False,  # causal LM, lm.eval_mode=generate: dev examples whose decoded answer is no label
}


def higher_is_better(name: str) -> bool:
    """The direction of a metric; a metric the suite does not know is an error, not a guess from its name."""
    try:
        return HIGHER_IS_BETTER[name]
    except KeyError:
        raise KeyError(f"metric '{name}' has no direction in bench/metrics.py HIGHER_IS_BETTER") from None


def directions(metrics: dict) -> dict[str, bool]:
    """{name: higher_is_better} for the metrics of a record."""
    return {name: higher_is_better(name) for name in metrics}


def compute(names: list[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute the named GLUE metrics. `preds` are class ids (classification) or scores (regression)."""
    return {name: METRICS[name](np.asarray(preds), np.asarray(labels)) for name in names}
