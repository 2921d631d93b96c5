"""The RL loop's data: what a rollout produces per sample, and the padded batch the trainer learns from.

A rollout source (Ray workers through the services, or the in-process one) returns one
:class:`Experience` per sampled response. The trainer lays a list of them on the teacher-forcing grid
with :func:`make_batch` (an :class:`ExperienceBatch`), then its *make experience* phase fills in what
only the trainer can compute: the old policy's logprobs, values, KL-penalised per-token rewards,
advantages and returns. Shapes: B samples, L = the longest prompt+response in the batch; every per-token
field is on the target grid ``ids[:, 1:]`` (length L-1) — logits at position j predict ``ids[j+1]``, so
response token k of a sample with prompt length P sits at target position P-1+k.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    """One sampled response and everything the rollout knows about it (plain lists: it crosses Ray)."""

    prompt: str
    prompt_ids: list[int]  # [P] the chat-formatted prompt
    response_ids: list[int]  # [R] sampled tokens (the end token included when the turn ended)
    logprobs: list[float]  # [R] behaviour-policy logprobs of response_ids (policy-inference, at sampling time)
    ref_logprobs: list[float]  # [R] reference (SFT) logprobs of the same tokens
    score: float  # reward-model score of the whole response (bias included)
    finished: bool  # the response ended its turn with the end token
    version: int  # policy version that produced it (staleness = trainer version - version)
    text: str = ""  # the decoded response (for the gold labeler's observation metrics)


@dataclass
class ExperienceBatch:
    """B samples right-padded to length L. The first eight fields come from the rollout (:func:`make_batch`);
    the rest are None until the trainer's make-experience phase computes them."""

    ids: torch.Tensor  # [B, L] long, prompt+response, right-padded with pad_id
    att: torch.Tensor  # [B, L] long, 1 on real tokens
    mask: torch.Tensor  # [B, L-1] float, 1 on response targets (the actions), 0 on prompt and padding
    logprobs: torch.Tensor  # [B, L-1] behaviour-policy logprobs (0 off the response)
    ref_logprobs: torch.Tensor  # [B, L-1] reference logprobs (0 off the response)
    scores: torch.Tensor  # [B] reward-model scores
    versions: torch.Tensor | None = None  # [B] long, the policy version that sampled each row
    groups: torch.Tensor | None = None  # [B] long, rows with the same prompt share a group (critic-free baselines)
    # --- make experience (trainer) ---
    old_logprobs: torch.Tensor | None = None  # [B, L-1] π_old: recomputed by the trainer, or = logprobs
    values: torch.Tensor | None = None  # [B, L-1] value-model estimates V(s_t) (0 off the response)
    rewards: torch.Tensor | None = None  # [B, L-1] per-token reward: −β·KL_t, plus the clipped score on the last
    kl: torch.Tensor | None = None  # [B, L-1] per-token KL estimate to the reference
    advantages: torch.Tensor | None = None  # [B, L-1] GAE advantages (whitened if configured)
    returns: torch.Tensor | None = None  # [B, L-1] value targets: advantages + values

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, idx: torch.Tensor) -> ExperienceBatch:
        """The rows ``idx`` of every field (a minibatch)."""
        return ExperienceBatch(**{f.name: None if (v := getattr(self, f.name)) is None else v[idx]
                                  for f in fields(self)})


def make_batch(exps: list[Experience], pad_id: int) -> ExperienceBatch:
    """Align experience on the teacher-forcing grid (module docstring)."""
    seqs = [e.prompt_ids + e.response_ids for e in exps]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(exps), L), pad_id, dtype=torch.long)
    att = torch.zeros(len(exps), L, dtype=torch.long)
    mask = torch.zeros(len(exps), L - 1)
    behaviour = torch.zeros(len(exps), L - 1)
    ref = torch.zeros(len(exps), L - 1)
    for i, (e, s) in enumerate(zip(exps, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        p, r = len(e.prompt_ids), len(e.response_ids)
        mask[i, p - 1: p - 1 + r] = 1
        behaviour[i, p - 1: p - 1 + r] = torch.tensor(e.logprobs, dtype=torch.float32)
        ref[i, p - 1: p - 1 + r] = torch.tensor(e.ref_logprobs, dtype=torch.float32)
    from chatrl.services.trainer.algos import group_ids

    return ExperienceBatch(ids, att, mask, behaviour, ref, torch.tensor([e.score for e in exps], dtype=torch.float32),
                           torch.tensor([e.version for e in exps], dtype=torch.long),
                           group_ids([tuple(e.prompt_ids) for e in exps]))
