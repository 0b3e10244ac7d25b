"""The "merged LoRA adds no latency" claim judged on ratios paired by round, and "too noisy to tell" when the
rounds disagree."""
from __future__ import annotations

import pandas as pd

from analysis import claims


def _lora(merged_p50: float, paired: float | None = None, noisy: bool | None = None) -> dict:
    row = {"task": "sst2", "method": "lora", "rank": 8, "main_metric_value": 0.8, "latency.base.p50_ms": 540.0,
           "latency.base.p95_ms": 560.0, "latency.merged.p50_ms": merged_p50, "latency.unmerged.p50_ms": 554.0}
    if paired is not None:
        row["latency.merged_over_base_ratio"] = paired
        row["latency.unmerged_over_base_ratio"] = 1.02
    if noisy is not None:
        row["latency.merged_over_base_too_noisy"] = noisy
    return row


def test_a_busy_spell_in_the_p50s_is_not_read_as_merged_overhead():
    # A measured case: merged/base p50 1.16 from a slow spell; per round merged and base are equal.
    verdict = claims.merged_lora_no_latency(pd.DataFrame([_lora(626.0, paired=1.003, noisy=False)]))
    assert verdict.verdict == "supported" and "median 1.003" in verdict.lines[0]


def test_runs_whose_rounds_disagree_are_too_noisy_to_tell():
    frame = pd.DataFrame([_lora(626.0, paired=1.16, noisy=True), _lora(600.0, paired=1.11, noisy=True)])
    assert claims.merged_lora_no_latency(frame).verdict == "too noisy to tell"
    mixed = pd.DataFrame([_lora(626.0, paired=1.16, noisy=True), _lora(541.0, paired=1.0, noisy=False)])
    claim = claims.merged_lora_no_latency(mixed)
    assert claim.verdict == "supported" and "1 too noisy to use, left out" in claim.lines[0]


def test_records_from_before_the_paired_ratio_use_the_p50_ratio():
    assert claims.merged_lora_no_latency(pd.DataFrame([_lora(545.0)])).verdict == "supported"
    assert claims.merged_lora_no_latency(pd.DataFrame([_lora(626.0)])).verdict == "not supported"
