"""Active selection (``reward.active_selection``): which prompts get comparison tasks, chosen by how unsure
the current reward model is about them instead of at random.

A labeler's ranking teaches the reward model most where it cannot yet order the responses. For each
candidate prompt the selector samples K responses from the policy and scores them, then asks for labels on
the ``n`` prompts with the highest uncertainty:

- ``margin``: one reward model; uncertainty = minus the mean |r_i − r_j| over the C(K,2) pairs — responses
  scored close together are the pairs whose Bradley–Terry probability σ(r_i − r_j) is nearest ½;
- ``ensemble``: M reward models (e.g. trained on bootstrap resamples of the labels); uncertainty = the mean
  over pairs of the members' standard deviation of σ(r_i − r_j) — where they disagree, more labels settle it.

The candidates are ``pool_factor × n`` prompts drawn at random (sampling and scoring every prompt each round
would cost more than the labels save). The tasks themselves are then sampled by the label path as always
(:func:`~chatrl.services.trainer.labels.collect_rankings` takes the selector as its ``select`` hook), so the
uncertainty is the reward model's on each prompt's response distribution, not on the exact K responses
the labelers will see. Before a round has a reward model there is nothing to be unsure with: off.

No gRPC here; the in-process scorer (:func:`in_process_scores`) samples and scores with models in this
process (the benchmark, ``chatrl train reward``); a service-backed scorer would call Generate and Score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import Prompt
from chatrl.services.core.model import GPT
from chatrl.services.core.scoring import score_pairs

MODES = ("off", "margin", "ensemble")
# candidates → reward scores [M, P, K]: M reward models, P prompts, K sampled responses each
Scores = Callable[[list[Prompt]], np.ndarray]


def pairwise_margin(scores: np.ndarray) -> np.ndarray:
    """``[P, K]`` scores → ``[P]``: the mean |r_i − r_j| over the C(K,2) pairs of each prompt."""
    i, j = np.triu_indices(scores.shape[1], k=1)
    return np.abs(scores[:, i] - scores[:, j]).mean(axis=1)


def ensemble_disagreement(scores: np.ndarray) -> np.ndarray:
    """``[M, P, K]`` scores → ``[P]``: the mean over pairs of the std across the M members of σ(r_i − r_j)."""
    i, j = np.triu_indices(scores.shape[2], k=1)
    prob = 1.0 / (1.0 + np.exp(-(scores[:, :, i] - scores[:, :, j])))  # [M, P, pairs]
    return prob.std(axis=0).mean(axis=1)


def uncertainty(mode: str, scores: np.ndarray) -> np.ndarray:
    """``[P]``, higher = the reward model(s) less sure how to order the prompt's responses."""
    if mode == "margin":
        return -pairwise_margin(scores.mean(axis=0))
    if mode == "ensemble":
        if scores.shape[0] < 2:
            raise ValueError("reward.active_selection: ensemble needs at least 2 reward models")
        return ensemble_disagreement(scores)
    raise ValueError(f"reward.active_selection must be one of {', '.join(MODES[1:])} here, got {mode!r}")


class ActiveSelector:
    """The ``select`` hook of :func:`~chatrl.services.trainer.labels.collect_rankings`: ``n`` of the prompts,
    the most uncertain of ``pool_factor × n`` random candidates (ties keep candidate order)."""

    def __init__(self, mode: str, scores: Scores, pool_factor: int = 4) -> None:
        self.mode, self.scores, self.pool_factor = mode, scores, pool_factor
        self.last: np.ndarray | None = None  # the uncertainty of the last candidates (for reports)

    def __call__(self, prompts: Sequence[Prompt], n: int, rng: np.random.Generator) -> list[int]:
        cand = rng.choice(len(prompts), size=min(len(prompts), self.pool_factor * n), replace=False)
        self.last = uncertainty(self.mode, np.asarray(self.scores([prompts[i] for i in cand])))
        return [int(cand[i]) for i in np.argsort(-self.last, kind="stable")[:n]]


def in_process_scores(policy: GPT, reward_models: Sequence[tuple[GPT, float]], tok, cfg: RunConfig,
                      seed: int) -> Scores:
    """K = ``reward.k`` responses per candidate sampled from ``policy`` (``reward`` sampling settings), scored
    by each (reward model, bias)."""
    from chatrl.services.trainer.labels import sample_responses

    rc = cfg.reward

    def scores(prompts: list[Prompt]) -> np.ndarray:
        samples = sample_responses(policy, tok, prompts, rc.k, rc.temperature, rc.max_new_tokens, seed, cfg)
        flat_p = [p for p, _ in zip(prompts, samples) for _ in range(rc.k)]
        flat_r = [r for texts, _ in samples for r in texts]
        flat_f = [f for _, fins in samples for f in fins]
        return np.stack([np.asarray(score_pairs(rm, tok, flat_p, flat_r, flat_f, bias, dtype=cfg.dtype,
                                                device=cfg.device)).reshape(len(prompts), rc.k)
                         for rm, bias in reward_models])

    return scores


def selector_for(cfg: RunConfig, scores: Scores | None) -> ActiveSelector | None:
    """The selector ``reward.active_selection`` asks for, or None (random) when it is off or there is no
    reward model to be unsure with yet (``scores`` None)."""
    mode = cfg.reward.active_selection
    if mode == "off" or scores is None:
        return None
    if mode not in MODES:
        raise ValueError(f"reward.active_selection must be one of {', '.join(MODES)}, got {mode!r}")
    return ActiveSelector(mode, scores)
