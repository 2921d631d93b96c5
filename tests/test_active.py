"""Active selection (services/trainer/active.py): the prompts whose responses the reward model cannot yet
order get the comparison tasks, through the label path's ``select`` hook; off by default."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chatrl.services.core.config import RunConfig, load_config
from chatrl.services.trainer import active


def test_margin_is_the_mean_absolute_score_gap_over_the_pairs():
    # K = 3: gaps |0-1| = 1, |0-3| = 3, |1-3| = 2 → 2;  all equal → 0
    assert active.pairwise_margin(np.array([[0.0, 1.0, 3.0], [5.0, 5.0, 5.0]])).tolist() == [2.0, 0.0]


def test_ensemble_disagreement_is_the_members_spread_of_the_pair_probabilities():
    # one prompt, K = 2: member 1 says r0 - r1 = +ln 3 (σ = 3/4), member 2 says -ln 3 (σ = 1/4) → std 1/4;
    # agreeing members → 0
    s = np.array([[[math.log(3), 0.0], [1.0, 1.0]], [[0.0, math.log(3)], [2.0, 2.0]]])  # [M=2, P=2, K=2]
    assert active.ensemble_disagreement(s) == pytest.approx([0.25, 0.0])


def test_the_selector_asks_for_labels_on_the_closest_scored_prompts_among_its_candidates():
    prompts = [f"p{i}" for i in range(6)]
    gap = {"p0": 3.0, "p1": 0.1, "p2": 2.0, "p3": 0.5, "p4": 1.0, "p5": 0.2}
    seen = []

    def scores(cands):  # one reward model; K = 2 responses whose scores differ by the prompt's gap
        seen.extend(cands)
        return np.array([[[0.0, gap[p]] for p in cands]])

    sel = active.ActiveSelector("margin", scores, pool_factor=3)
    picked = sel(prompts, 2, np.random.default_rng(0))
    assert sorted(seen) == prompts  # 3 × 2 candidates = every prompt
    assert [prompts[i] for i in picked] == ["p1", "p5"]


def test_ensemble_mode_needs_several_reward_models():
    with pytest.raises(ValueError, match="at least 2 reward models"):
        active.uncertainty("ensemble", np.zeros((1, 3, 2)))


def test_off_by_default_and_the_config_names_the_modes():
    assert RunConfig().reward.active_selection == "off"
    assert active.selector_for(RunConfig(), lambda p: np.zeros((1, len(p), 2))) is None
    with pytest.raises(ValueError, match="reward.active_selection must be off, margin or ensemble"):
        load_config(None, ["reward.active_selection=most"])


def test_the_label_path_creates_tasks_for_the_prompts_the_hook_selects(tmp_path, tiny_gold):
    from kit import tiny_gpt, tiny_tokenizer

    from chatrl.services.core.feedback_store import FeedbackStore
    from chatrl.services.core.gold import GoldLabeler
    from chatrl.services.trainer import labels
    from chatrl.services.trainer.stages.common import Reporter

    cfg = load_config(None, ["reward.num_prompts=2", "reward.k=2", "reward.max_new_tokens=3", "pipeline.labelers=1"])
    tok = tiny_tokenizer()
    prompts = ["How was the film?", "Did you like the cast?", "Tell me about the story.", "Write a review."]
    with FeedbackStore(tmp_path / "f.db") as store:
        local = labels.LocalLabels(store, tiny_gpt(tok.vocab_size), tok, cfg)
        got = labels.collect_rankings(cfg, local, prompts, GoldLabeler.load(tiny_gold), "r1", tmp_path / "r1.jsonl",
                                      Reporter(quiet=True), select=lambda p, n, rng: [3, 1][:n])
    assert sorted(r.prompt for r in got) == ["Did you like the cast?", "Write a review."]
