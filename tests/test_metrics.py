"""GLUE metrics against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.metrics import compute

PREDS = np.array([1, 0, 1, 1, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1, 1])
# confusion: TP=3 (idx 0,3,5), TN=1 (idx 1), FP=1 (idx 2), FN=1 (idx 4)


def test_accuracy_and_f1():
    got = compute(["accuracy", "f1"], PREDS, LABELS)
    assert got["accuracy"] == pytest.approx(4 / 6)
    precision, recall = 3 / 4, 3 / 4
    assert got["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_matthews_correlation():
    tp, tn, fp, fn = 3, 1, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute(["matthews_correlation"], PREDS, LABELS)["matthews_correlation"] == pytest.approx(mcc)


def test_pearson_and_spearman():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.0, 6.0, 9.0])
    got = compute(["pearson", "spearmanr"], x, y)
    xm, ym = x - x.mean(), y - y.mean()
    assert got["pearson"] == pytest.approx((xm @ ym) / math.sqrt((xm @ xm) * (ym @ ym)))
    assert got["spearmanr"] == pytest.approx(1.0)  # monotone
    assert compute(["spearmanr"], x, -y)["spearmanr"] == pytest.approx(-1.0)
