"""Reward-model scoring shared by the trainer and the reward-scoring service.

A (prompt, response) pair becomes the chat sequence ``<|user|>prompt<|end|><|assistant|>response``
followed by ``<|end|>`` when the response ended its turn; the reward is the scalar head at the last
real token plus the model's bias (chosen so that SFT samples average 0)."""

from __future__ import annotations

import torch

from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.tokenizer import ChatTokenizer


def pair_ids(tok: ChatTokenizer, prompt: str, response: str, finished: bool, max_len: int) -> list[int]:
    """Token ids of a (prompt, response) pair, keeping the end of the response if too long."""
    p = tok.prompt_ids(prompt)
    r = tok.encode(response) + ([tok.end_id] if finished else [])
    ids = p + r
    if len(ids) > max_len:  # keep the whole response if we can, trimming the prompt's start
        ids = ids[-max_len:]
    return ids


def right_pad(seqs: list[list[int]], pad_id: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def last_token_scalar(model: GPT, seqs: list[list[int]], pad_id: int, dtype: str | None = None,
                      device: str = "cpu") -> torch.Tensor:
    """Scalar head at each sequence's last real token, [B] float32 (differentiable)."""
    if model.scalar_head is None:
        raise ValueError("model has no scalar head")
    ids, mask = right_pad(seqs, pad_id, device)
    with autocast(dtype, device.split(":")[0]):
        out = model(ids, mask, lm_head=False)
    last = mask.sum(dim=1) - 1
    return out.scalar.float()[torch.arange(len(seqs), device=ids.device), last]


@torch.no_grad()
def score_pairs(model: GPT, tok: ChatTokenizer, prompts: list[str], responses: list[str], finished: list[bool],
                bias: float = 0.0, batch_size: int = 64, dtype: str | None = None, device: str = "cpu"
                ) -> list[float]:
    model.eval()
    seqs = [pair_ids(tok, p, r, f, model.cfg.max_seq_len) for p, r, f in zip(prompts, responses, finished)]
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        out += (last_token_scalar(model, seqs[i: i + batch_size], tok.pad_id, dtype, device) + bias).tolist()
    return out
