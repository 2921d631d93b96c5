"""Evaluation on held-out prompts with the gold simulated labeler (never shown to the reward model)."""

from __future__ import annotations

import math

import numpy as np

from services.core.config import RunConfig
from services.core.model import GPT
from services.core.tokenizer import ChatTokenizer


def gold_eval(model: GPT, tok: ChatTokenizer, prompts: list[str], gold, cfg: RunConfig, n: int = 200,
              max_new_tokens: int | None = None, temperature: float = 1.0, seed: int = 99) -> dict[str, float]:
    """Sample one response per held-out prompt; score with the gold labeler.
    Returns mean gold score, its standard error, finished rate and mean response length (words)."""
    from services.trainer.stages.reward_model import sample_responses

    prompts = prompts[:n]
    samples = sample_responses(model, tok, prompts, 1, temperature, max_new_tokens or cfg.reward.max_new_tokens,
                               seed, cfg, batch_prompts=32)
    scores, lens, fins = [], [], []
    for p, (texts, fin) in zip(prompts, samples):
        scores.append(gold.score(p, texts[0], fin[0]))
        lens.append(len(texts[0].split()))
        fins.append(float(fin[0]))
    s = np.asarray(scores)
    return {"gold": float(s.mean()), "gold_se": float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
            "finished": float(np.mean(fins)), "length": float(np.mean(lens)), "n": float(len(s))}
