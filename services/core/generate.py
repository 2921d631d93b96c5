"""Sampling with a KV cache: temperature, top-k, top-p, per-row seeds, stop tokens.

Log-probabilities returned with every sampled token are those of the temperature-scaled model
distribution *before* top-k/top-p truncation — what PPO's old-policy logprobs must be, and what the
trainer and reference model recompute with ``log_softmax(logits / temperature)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from chatrl.services.core.model import GPT, KVCache, autocast


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def validate(self, max_seq_len: int | None = None) -> None:
        if not 1 <= self.max_new_tokens <= (max_seq_len or 1 << 20):
            raise ValueError(f"max_new_tokens must be in [1, {max_seq_len}], got {self.max_new_tokens}")
        if not (0.0 <= self.temperature <= 10.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (a stop token was produced; it is included) | "length"


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [V] outside the top-k / nucleus (top-p) set with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_l, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_l, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        drop = cum - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_l = sorted_l.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_l)
    return logits


class RowSampler:
    """One row's sampling parameters and RNG (a seeded row draws the same tokens in any batch)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = random.Random(params.seed)  # seed None: fresh entropy
        self.truncates = bool(params.top_k) or params.top_p < 1.0

    def uniform(self) -> float:
        return max(self.rng.random(), 1e-12)

    def __call__(self, logits: torch.Tensor) -> tuple[int, float]:
        """Sample from one row's logits [V]."""
        toks, lps = sample_rows(logits[None], [self])
        return toks[0], lps[0]


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> tuple[list[int], list[float]]:
    """One token per row of ``logits`` [B, V], each row under its own sampler, batched over the rows.

    Inverse-CDF sampling: one uniform per token from the row's RNG (``torch.multinomial`` would draw one
    per vocabulary entry). Returns the tokens and their logprobs under the temperature-scaled distribution
    before truncation (greedy rows: under the unscaled distribution)."""
    logits = logits.float()
    b, v = logits.shape
    temps = torch.tensor([s.params.temperature for s in samplers], dtype=torch.float32)
    greedy = temps == 0
    base_lp = torch.log_softmax(logits / torch.where(greedy, 1.0, temps)[:, None].to(logits.device), dim=-1)
    probs = base_lp.exp()
    for i, s in enumerate(samplers):
        if s.truncates and not greedy[i]:
            p = s.params
            probs[i] = torch.softmax(truncate_logits(logits[i] / p.temperature, p.top_k, p.top_p), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor([s.uniform() if s.params.temperature else 0.0 for s in samplers], dtype=torch.float32)
    tok = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1])[:, None]).clamp_(max=v - 1)
    if bool(greedy.any()):
        tok = torch.where(greedy[:, None].to(tok.device), logits.argmax(-1, keepdim=True), tok)
    lp = base_lp.gather(1, tok)
    return tok[:, 0].tolist(), lp[:, 0].tolist()


def left_pad(seqs: list[list[int]], pad_id: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), t, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, t - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, t - len(s):] = 1
    return ids, mask


@torch.no_grad()
def prefill(model: GPT, prompts: list[list[int]], pad_id: int, dtype: str | None = None,
            device: str = "cpu") -> tuple[torch.Tensor, KVCache]:
    """Run the prompts (left-padded) through the model; return last-position logits [B, V] and cache."""
    ids, mask = left_pad(prompts, pad_id, device)
    with autocast(dtype, device.split(":")[0]):
        out = model(ids, mask, use_cache=True)
    return out.logits[:, -1].float(), out.cache


@torch.no_grad()
def decode_step(model: GPT, tokens: list[int], cache: KVCache, dtype: str | None = None,
                device: str = "cpu") -> tuple[torch.Tensor, KVCache]:
    ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
    with autocast(dtype, device.split(":")[0]):
        out = model(ids, None, cache=cache, use_cache=True)
    return out.logits[:, -1].float(), out.cache


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             pad_id: int = 0, dtype: str | None = None, device: str = "cpu") -> list[Sample]:
    """Batched sampling of one continuation per prompt (repeat a prompt for n samples)."""
    if not prompts:
        return []
    plist = params if isinstance(params, list) else [params] * len(prompts)
    max_len = model.cfg.max_seq_len
    for p, pr in zip(plist, prompts):
        if not pr:
            raise ValueError("prompt must not be empty")
        if len(pr) + p.max_new_tokens > max_len:
            raise ValueError(f"prompt length {len(pr)} + max_new_tokens {p.max_new_tokens} exceeds "
                             f"max_seq_len {max_len}")
    samplers = [RowSampler(p) for p in plist]
    model.eval()
    out = [Sample() for _ in prompts]
    logits, cache = prefill(model, prompts, pad_id, dtype, device)
    active = list(range(len(prompts)))
    while active:
        nxt, keep = [], []
        toks, lps = sample_rows(logits, [samplers[i] for i in active])
        for j, i in enumerate(active):
            tok, lp = toks[j], lps[j]
            s = out[i]
            s.tokens.append(tok)
            s.logprobs.append(lp)
            if tok in plist[i].stop_token_ids:
                s.finish_reason = "stop"
            elif len(s.tokens) >= plist[i].max_new_tokens:
                s.finish_reason = "length"
            else:
                keep.append(j)
                nxt.append(tok)
        if not keep:
            break
        if len(keep) < len(active):
            cache = cache.select(keep)
        active = [active[j] for j in keep]
        logits, cache = decode_step(model, nxt, cache, dtype, device)
    return out


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   max_elems: int = 1 << 24) -> torch.Tensor:
    """``log_softmax(logits / temperature)[b, t, targets[b, t]]`` as ``logit - logsumexp``, in chunks of
    at most ``max_elems`` fp32 logits, so no full fp32 ``[B, T, V]`` copy (nor its softmax) is built: with a
    152k vocabulary that copy is 600 kB per token.

    Args: logits ``[B, T, V]`` (any float dtype; position t scores ``targets[:, t]``), targets ``[B, T]``.
    Returns: ``[B, T]`` float32.
    """
    b, t, v = logits.shape
    out = torch.empty(b, t, dtype=torch.float32, device=logits.device)
    step = max(1, max_elems // max(1, v))  # (row, position) pairs per chunk
    flat, tgt, dst = logits.reshape(b * t, v), targets.reshape(b * t), out.view(b * t)
    for s in range(0, b * t, step):
        chunk = flat[s:s + step].float() / temperature  # [step, V] fp32
        dst[s:s + step] = chunk.gather(-1, tgt[s:s + step, None]).squeeze(-1) - torch.logsumexp(chunk, -1)
    return out


def head_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  max_elems: int = 1 << 24) -> torch.Tensor:
    """:func:`token_logprobs` from hidden states: the output projection ``head`` runs on at most ``max_elems``
    logits at a time, so neither the ``[N, V]`` logits nor their fp32 copy exist whole (with a 49k
    vocabulary, 4,800 response tokens would be 0.9 GB of fp32 logits).

    Args: hidden ``[N, D]`` (the positions that predict ``targets``), targets ``[N]``. Returns ``[N]`` float32.
    """
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    step = max(1, max_elems // max(1, head.weight.shape[0]))
    for s in range(0, n, step):
        out[s:s + step] = token_logprobs(head(hidden[s:s + step])[None], targets[None, s:s + step], temperature,
                                         max_elems)[0]
    return out


@torch.no_grad()
def sequence_logprobs(model: GPT, seqs: list[list[int]], pad_id: int = 0, temperature: float = 1.0,
                      dtype: str | None = None, device: str = "cpu", chunk: int = 16) -> list[list[float]]:
    """logprob of every token of each sequence given its prefix (first token gets 0.0); right-padded.

    ``chunk`` sequences at a time, each chunk padded to its own longest, and the output projection on real
    positions only, a bounded slice at a time (:func:`head_logprobs`): the logits of a real vocabulary are
    [rows, length, 49k] floats (128 rows x 100 tokens of SmolLM2 are 2.5 GB)."""
    out: list[list[float]] = []
    for c in range(0, len(seqs), chunk):
        part = seqs[c: c + chunk]
        t = max(len(s) for s in part)
        if t < 2:  # nothing is predicted from a prefix
            out.extend([0.0] * len(s) for s in part)
            continue
        ids = torch.full((len(part), t), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(part):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        real = mask[:, 1:].bool()  # positions that predict a real token
        with autocast(dtype, device.split(":")[0]):
            hidden = model(ids[:, :-1], mask[:, :-1], lm_head=False).hidden
            lp = head_logprobs(model.lm_head, hidden[real], ids[:, 1:][real], temperature or 1.0).tolist()
        at = 0
        for s in part:
            k = max(0, len(s) - 1)
            out.append([0.0] + lp[at:at + k])
            at += k
    return out
