"""Evaluation on held-out prompts with the gold simulated labeler (never shown to the reward model)."""

from __future__ import annotations

import math

import numpy as np

from chatrl.services.core.config import RunConfig


def evaluate_stage(cfg: RunConfig, ck, ref_ckpt, rm_ckpt, prompts: list[str], gold, temperature: float = 1.0,
                   seed: int = 99) -> dict[str, float]:
    """Held-out evaluation of one checkpoint: gold score (± standard error), reward-model score, KL to
    the reference (SFT) model per response, response length and finished-turn rate."""
    import torch

    from chatrl.services.core.checkpoint import load_checkpoint
    from chatrl.services.core.generate import sequence_logprobs
    from chatrl.services.core.scoring import score_pairs
    from chatrl.services.trainer.stages.common import model_from_checkpoint, tokenizer_from_checkpoint

    tok = tokenizer_from_checkpoint(ck)
    policy = model_from_checkpoint(ck, device=cfg.device).eval()
    ref = model_from_checkpoint(load_checkpoint(ref_ckpt), device=cfg.device).eval()
    max_new = cfg.ppo.max_new_tokens
    out: list[tuple[str, list[int], list[int], str, bool]] = []
    from chatrl.services.core.generate import SamplingParams, generate

    for i in range(0, len(prompts), 32):
        chunk = prompts[i: i + 32]
        pids = [tok.prompt_ids(p)[-(policy.cfg.max_seq_len - max_new):] for p in chunk]
        params = [SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed + i + j,
                                 stop_token_ids=(tok.end_id,)) for j in range(len(chunk))]
        for p, pi, s in zip(chunk, pids, generate(policy, pids, params, tok.pad_id, cfg.dtype, cfg.device)):
            text, fin = tok.response_text(s.tokens)
            out.append((p, pi, s.tokens, text, fin))
    g = np.asarray([gold.score(p, t, f) for p, _, _, t, f in out])
    seqs = [pi + r for _, pi, r, _, _ in out]
    with torch.no_grad():
        lp_pol = sequence_logprobs(policy, seqs, tok.pad_id, temperature, cfg.dtype, cfg.device)
        lp_ref = sequence_logprobs(ref, seqs, tok.pad_id, temperature, cfg.dtype, cfg.device)
    kls = [sum(a[len(pi):]) - sum(b[len(pi):]) for a, b, (_, pi, _, _, _) in zip(lp_pol, lp_ref, out)]
    res = {"gold": float(g.mean()), "gold_se": float(g.std(ddof=1) / math.sqrt(len(g))) if len(g) > 1 else 0.0,
           "kl": float(np.mean(kls)), "length": float(np.mean([len(t.split()) for _, _, _, t, _ in out])),
           "finished": float(np.mean([f for *_, f in out])), "n": float(len(out))}
    if rm_ckpt is not None:
        rck = load_checkpoint(rm_ckpt)
        rm = model_from_checkpoint(rck, scalar_head=True, device=cfg.device)
        sc = score_pairs(rm, tok, [p for p, *_ in out], [t for _, _, _, t, _ in out], [f for *_, f in out],
                         bias=float(rck.manifest["meta"].get("reward_bias", 0.0)), dtype=cfg.dtype, device=cfg.device)
        res["rm"] = float(np.mean(sc))
    res["gold_scores"] = [round(float(x), 5) for x in g]  # per prompt, for paired differences between stages
    res["samples"] = [{"prompt": p, "response": t, "finished": f} for p, _, _, t, f in out[:5]]
    return res
