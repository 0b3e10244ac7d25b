"""Intervals that count both sources of noise in a fine-tuning result: which test examples there are, and which seed
trained the model. A bootstrap replicate draws the test examples with replacement (one draw shared by every seed and
method: they were all scored on the same examples) and the seeds with replacement, and takes the mean over the drawn
seeds of the metric on the drawn examples; the 95% interval is the 2.5th and 97.5th percentiles over replicates
(Efron and Tibshirani 1993, ch. 13: the percentile interval). A paired difference between two methods draws the
same examples for both, so what the methods share (easy and hard examples) cancels.

Outcomes are a record's `dev_predictions` ({pred, label}: class ids, regression scores, or a generation task's 1/0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.metrics import METRICS

N_BOOT = 2000


@dataclass(frozen=True)
class Interval:
    estimate: float  # the mean over seeds of the metric on every example
    low: float
    high: float
    seeds: int
    examples: int

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        return (f"{scale * self.estimate:.{digits}f} [{scale * self.low:.{digits}f}, "
                f"{scale * self.high:.{digits}f}]")


def _arrays(outcomes: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(preds: seeds x examples, labels: examples), refusing outcomes over different examples."""
    labels = np.asarray(outcomes[0]["label"], dtype=float)
    preds = []
    for o in outcomes:
        if len(o["pred"]) != len(labels) or not np.array_equal(np.asarray(o["label"], dtype=float), labels):
            raise ValueError("outcomes over different test examples: intervals need the same examples for every seed")
        preds.append(np.asarray(o["pred"], dtype=float))
    return np.stack(preds), labels


def _scores(preds: np.ndarray, labels: np.ndarray, metric: str, idx: np.ndarray, seeds: np.ndarray) -> float:
    """Mean over the drawn seeds of the metric on the drawn examples."""
    if metric == "accuracy":  # the common case, vectorised
        return float((preds[np.ix_(seeds, idx)] == labels[idx]).mean())
    fn = METRICS[metric]
    return float(np.mean([fn(preds[s, idx], labels[idx]) for s in seeds]))


def _draws(rng: np.random.Generator, n_examples: int, n_seeds: int, n_boot: int):
    for _ in range(n_boot):
        yield rng.integers(0, n_examples, n_examples), rng.integers(0, n_seeds, n_seeds)


def bootstrap(outcomes: list[dict], metric: str, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """The metric's mean over seeds with its 95% bootstrap interval over examples and seeds."""
    preds, labels = _arrays(outcomes)
    n_seeds, n = preds.shape
    everything = np.arange(n)
    estimate = _scores(preds, labels, metric, everything, np.arange(n_seeds))
    rng = np.random.default_rng(seed)
    values = [_scores(preds, labels, metric, idx, s) for idx, s in _draws(rng, n, n_seeds, n_boot)]
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(estimate, float(low), float(high), n_seeds, n)


def paired_difference(a: list[dict], b: list[dict], metric: str, n_boot: int = N_BOOT, seed: int = 0
                      ) -> tuple[Interval, float]:
    """(a minus b with its 95% bootstrap interval, the share of replicates where a is not better than b: a one-sided
    bootstrap p-value). The examples are drawn once per replicate for both; the seeds of each independently."""
    pa, labels = _arrays(a)
    pb, labels_b = _arrays(b)
    if not np.array_equal(labels, labels_b):
        raise ValueError("the two methods were scored on different test examples: no paired comparison")
    n = len(labels)
    estimate = (_scores(pa, labels, metric, np.arange(n), np.arange(len(pa)))
                - _scores(pb, labels, metric, np.arange(n), np.arange(len(pb))))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        sa, sb = rng.integers(0, len(pa), len(pa)), rng.integers(0, len(pb), len(pb))
        diffs.append(_scores(pa, labels, metric, idx, sa) - _scores(pb, labels, metric, idx, sb))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Interval(estimate, float(low), float(high), min(len(pa), len(pb)), n), float(np.mean(np.asarray(diffs) <= 0))
