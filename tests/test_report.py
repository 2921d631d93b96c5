"""The report's lift lines: gold(last round) − gold(start) in standard errors, paired over the held-out
prompts when both evaluations kept per-prompt scores — checked against hand-computed values."""

from __future__ import annotations

import math

from chatrl.services.trainer.report import BASE_LABEL, lift, lift_lines


def test_paired_lift_uses_the_spread_of_per_prompt_differences():
    before = {"gold": 0.5, "gold_se": 0.5, "gold_scores": [0.0, 1.0, 0.0, 1.0]}
    after = {"gold": 1.0, "gold_se": 0.5, "gold_scores": [1.0, 1.0, 0.0, 2.0]}
    d, se, how = lift(after, before)
    # differences 1, 0, 0, 1: mean 0.5, sample variance 1/3, SE sqrt(1/3 / 4)
    assert how == "paired" and d == 0.5 and math.isclose(se, math.sqrt(1 / 12))


def test_unpaired_lift_without_per_prompt_scores_or_with_other_prompts():
    before = {"gold": -1.0, "gold_se": 0.3}
    after = {"gold": 0.2, "gold_se": 0.4, "gold_scores": [0.1, 0.3]}
    d, se, how = lift(after, before)
    assert how == "unpaired" and math.isclose(d, 1.2) and math.isclose(se, 0.5)
    d, se, how = lift(after, {**before, "gold_scores": [0.0, 0.0, 0.0]})  # another number of prompts
    assert how == "unpaired" and math.isclose(se, 0.5)


def test_lift_lines_compare_the_last_round_with_sft_and_the_base_model():
    evals = {BASE_LABEL: {"gold": -1.0, "gold_se": 0.3}, "SFT": {"gold": 0.0, "gold_se": 0.3},
             "GRPO round 0": {"gold": 0.8, "gold_se": 0.4, "n": 128.0}}
    lines = lift_lines(evals)
    assert lines[1] == ("Held-out gold, GRPO round 0 − SFT: +0.800 (+1.6 standard errors of the unpaired "
                        "difference, n = 128).")
    assert lines[2].startswith(f"Held-out gold, GRPO round 0 − {BASE_LABEL}: +1.800 (+3.6 standard errors")
    assert lift_lines({"SFT": evals["SFT"]}) == []
