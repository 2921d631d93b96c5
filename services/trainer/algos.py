"""The math of every training stage, as pure torch functions.

No gRPC, no Ray, no I/O: tensors in, tensors (or plain floats) out.

Conventions
-----------
* Token-level tensors are ``[B, T]`` (batch, time); vocabulary logits are ``[B, T, V]``.
* ``mask`` is a float or bool ``[B, T]`` tensor, 1 (True) for tokens that count — response tokens in
  PPO, assistant tokens in SFT. Masks need not start at ``t = 0`` (prompt first, then response) and
  rows may be left- or right-padded.
* A *masked mean* is ``sum(x * mask) / sum(mask)`` over every token of the batch (not per row first)
  unless a ``dim`` is given. An all-zero mask gives 0, not NaN.
* Token-level outputs are zero outside the mask.
* ``stats`` dicts and accuracies are plain Python floats (detached), ready for logging / JSON.

Stages
------
* pre-training / SFT: :func:`shift_for_lm`, :func:`lm_loss`
* reward model: :func:`ranking_loss`, :func:`pairwise_loss`, :func:`reward_bias`, :func:`normalize_rewards`
* PPO: :func:`logprobs_from_logits`, :func:`entropy_from_logits`, :func:`kl_penalized_rewards`,
  :func:`gae`, :func:`masked_whiten`, :func:`policy_loss`, :func:`value_loss`, :func:`ppo_ptx_loss`,
  :class:`AdaptiveKLController`, :class:`FixedKLController`
* critic-free RL (GRPO, RLOO, REINFORCE++ with baseline): :func:`group_ids`, :func:`group_advantages`,
  :func:`returns_to_go`, :func:`kl_loss`, :func:`loss_mean` (token- vs sequence-level normalisation)
* DPO / IPO: :func:`ranking_pairs`, :func:`dpo_loss`
* the logprob consistency gate: :func:`logprob_gate`
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "DPO_LOSSES",
    "GROUP_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_NORMS",
    "dpo_loss",
    "group_advantages",
    "group_ids",
    "kl_loss",
    "logprob_gate",
    "loss_mean",
    "ranking_pairs",
    "returns_to_go",
    "entropy_from_logits",
    "gae",
    "kl_penalized_rewards",
    "kl_per_token",
    "last_token_index",
    "lm_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "normalize_rewards",
    "pairwise_loss",
    "policy_loss",
    "ppo_ptx_loss",
    "ranking_loss",
    "reward_bias",
    "shift_for_lm",
    "value_loss",
]

_TINY = 1e-12


def _as_float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool/int/float) as a floating tensor of ``like``'s dtype and device."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(device=like.device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    Args:
        x: any shape, e.g. ``[B, T]``.
        mask: broadcastable to ``x`` (bool or float weights).
        dim: ``None`` → one scalar over all masked entries of the batch; an int → the mean along that
            dimension (e.g. ``dim=1`` gives a ``[B]`` per-row mean).

    Returns:
        0-d tensor (``dim=None``) or ``x`` reduced along ``dim``. Where the mask sums to 0 the result
        is 0 (not NaN).
    """
    m = _as_float_mask(mask, x)
    # where(): a NaN/inf outside the mask (e.g. logprobs of padding) must not leak in through 0 * inf.
    xm = torch.where(m != 0, x * m, torch.zeros((), dtype=m.dtype, device=x.device))
    if dim is None:
        return xm.sum() / m.sum().clamp(min=_TINY)
    return xm.sum(dim=dim) / m.sum(dim=dim).clamp(min=_TINY)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked entries of the batch (0-d tensor).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` with ``n = sum(mask)``; when
    ``n <= 1`` the correction is skipped (the result is then 0, not a division by zero).
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        correction = torch.where(n > 1, n / (n - 1).clamp(min=_TINY), torch.ones_like(n))
        var = var * correction
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to unit (unbiased) variance over the masked entries of the whole batch.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back (only the
    scale changes — used for rewards, so their sign is kept). Statistics use masked entries only;
    the output is zero outside the mask. Shape as ``x`` (``[B, T]``).
    """
    m = _as_float_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m != 0, out, torch.zeros_like(out))


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``mask`` is 1, per row.

    Args:
        mask: ``[B, T]``.

    Returns:
        ``[B]`` long tensor; -1 for a row with no masked token.
    """
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(dim=-1).values


# --------------------------------------------------------------------------------------------------
# language modelling (pre-training, SFT, PPO-ptx)
# --------------------------------------------------------------------------------------------------


def shift_for_lm(
    input_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a token batch for teacher forcing.

    Args:
        input_ids: ``[B, T]`` token ids.
        mask: ``[B, T]`` aligned with ``input_ids``: 1 for tokens that should be *predicted* (e.g.
            assistant tokens in SFT; padding 0). ``None`` → every token is a target.

    Returns:
        ``(inputs [B, T-1], targets [B, T-1], target_mask [B, T-1])`` with ``inputs = ids[:, :-1]``,
        ``targets = ids[:, 1:]`` and ``target_mask = mask[:, 1:]`` (float). Feed ``inputs`` to the
        model; its logits at position t predict ``targets[:, t]``.
    """
    inputs = input_ids[:, :-1]
    targets = input_ids[:, 1:]
    if mask is None:
        target_mask = torch.ones(targets.shape, dtype=torch.float32, device=input_ids.device)
    else:
        target_mask = mask[:, 1:].to(dtype=torch.float32)
    return inputs, targets, target_mask


def lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over counted tokens (0-d tensor).

    Args:
        logits: ``[B, T, V]``; position t predicts ``targets[:, t]`` (already shifted, see
            :func:`shift_for_lm`). Computed in float32 whatever the logits' dtype.
        targets: ``[B, T]`` token ids. Entries equal to ``ignore_index`` never count.
        mask: ``[B, T]``; ``None`` → all tokens count (pre-training); SFT passes the assistant mask.

    Returns:
        ``sum(CE * mask) / sum(mask)`` over the whole batch (0 if nothing counts).
    """
    B, T, V = logits.shape
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    ce = F.cross_entropy(logits.reshape(B * T, V).float(), safe_targets.reshape(B * T), reduction="none")
    ce = ce.view(B, T)
    m = valid.float() if mask is None else _as_float_mask(mask, ce) * valid.float()
    return masked_mean(ce, m)


def ppo_ptx_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None, coef: float = 1.0
) -> torch.Tensor:
    """PPO-ptx term (InstructGPT): ``coef * lm_loss(logits, targets, mask)`` on pre-training data.

    Add it to the PPO loss (it is a loss: minimise). ``coef`` is InstructGPT's γ.
    """
    return coef * lm_loss(logits, targets, mask)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each given token: ``log_softmax(logits)[b, t, tokens[b, t]]``.

    Args:
        logits: ``[B, T, V]`` (logits at t score ``tokens[:, t]`` — shift beforehand).
        tokens: ``[B, T]`` token ids.

    Returns:
        ``[B, T]`` float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at every position: ``[B, T, V] -> [B, T]`` (nats, float32).

    ``H = logsumexp(l) - sum(softmax(l) * l)``. Average with :func:`masked_mean` over response tokens.
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


# --------------------------------------------------------------------------------------------------
# reward model
# --------------------------------------------------------------------------------------------------


def ranking_loss(rewards: torch.Tensor, ranking: torch.Tensor, tied_with_next: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, float]:
    """Bradley–Terry loss over all C(k, 2) pairs of each prompt's ranking (InstructGPT), less tied pairs.

    Args:
        rewards: ``[B, K]`` scalar RM outputs, ``rewards[b, i]`` for response slot i of prompt b.
            Slots not named in ``ranking`` are ignored (their values may be anything finite).
        ranking: ``[B, K]`` long: response slot indices of prompt b, best first, padded with -1 for
            prompts with fewer than K responses (−1 entries are skipped wherever they are).
        tied_with_next: optional ``[B, K-1]`` bool: ranked position i of prompt b is tied with position
            i+1. Positions joined by a run of ties form one tier; two responses of the same tier form no
            pair (None: no ties).

    For every pair of ranked positions i < j in different tiers (winner w = ranking[b, i], loser
    l = ranking[b, j]) the pair loss is ``-log σ(r_w - r_l)``. Pair losses are averaged within a prompt,
    then over the prompts that have at least one pair (each prompt weighs the same whatever its k).
    Accuracy is averaged the same way, a pair being correct iff ``r_w > r_l`` strictly (equal scores
    count as wrong).

    Tied pairs are skipped rather than modelled with a tie term (Rao–Kupper / Davidson): BT has no
    probability for "neither is better" without an extra tie parameter that PPO's scalar reward never
    uses, and pulling tied scores together would fight the untied pairs that already order them; a tie
    still orders both responses against every other tier. Skipping is what the feedback store counts
    (``untied_pairs``) and what DPO's pairs do (``Ranking.pairs``).

    Returns:
        ``(loss, accuracy)``: 0-d tensor (differentiable w.r.t. ``rewards``) and a Python float.
        A batch without any pair gives loss 0 (still attached to the graph) and accuracy 0.0.
    """
    if rewards.shape != ranking.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and ranking must both be [B, K]; got {tuple(rewards.shape)} "
                         f"and {tuple(ranking.shape)}")
    B, K = ranking.shape
    ranking = ranking.to(device=rewards.device, dtype=torch.long)
    valid = ranking >= 0
    r_ranked = rewards.gather(1, ranking.clamp(min=0))  # [B, K], best first
    diff = r_ranked.unsqueeze(2) - r_ranked.unsqueeze(1)  # [B, K, K]: r_pos_i - r_pos_j
    upper = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pairs = upper & valid.unsqueeze(2) & valid.unsqueeze(1)  # [B, K, K]
    if tied_with_next is not None:
        if tied_with_next.shape != (B, K - 1):
            raise ValueError(f"tied_with_next must be [B, K-1] = [{B}, {K - 1}]; got {tuple(tied_with_next.shape)}")
        new_tier = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=rewards.device),
                              (~tied_with_next.to(device=rewards.device, dtype=torch.bool)).long()], dim=1)
        tier = new_tier.cumsum(dim=1)  # [B, K]: tier of each ranked position
        pairs = pairs & (tier.unsqueeze(2) != tier.unsqueeze(1))
    pairs = pairs.to(rewards.dtype)
    n_pairs = pairs.sum(dim=(1, 2))  # [B]
    has_pairs = (n_pairs > 0).to(rewards.dtype)
    n_prompts = has_pairs.sum().clamp(min=1.0)

    pair_loss = -F.logsigmoid(diff)
    per_prompt = (pair_loss * pairs).sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)
    loss = (per_prompt * has_pairs).sum() / n_prompts

    with torch.no_grad():
        correct = (diff > 0).to(rewards.dtype)
        per_prompt_acc = (correct * pairs).sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)
        accuracy = float((per_prompt_acc * has_pairs).sum() / n_prompts)
    return loss, accuracy


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Bradley–Terry loss for one preference pair per row: ``mean(-log σ(r_chosen - r_rejected))``.

    Args:
        r_chosen, r_rejected: ``[B]``.

    Returns:
        ``(loss, accuracy)`` with accuracy = fraction with ``r_chosen > r_rejected`` (Python float).
        Equal to :func:`ranking_loss` with K = 2.
    """
    diff = r_chosen - r_rejected
    loss = -F.logsigmoid(diff).mean()
    accuracy = float((diff.detach() > 0).float().mean())
    return loss, accuracy


def reward_bias(scores: torch.Tensor | Sequence[float]) -> float:
    """Bias that makes ``scores`` average 0: ``-mean(scores)``.

    Compute it on RM scores of reference (SFT) samples, then add it to every RM score
    (InstructGPT normalises the RM so that SFT outputs have mean reward 0).
    """
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if s.numel() == 0:
        raise ValueError("scores is empty")
    return float(-s.mean())


def normalize_rewards(scores: torch.Tensor, bias: float, scale: float = 1.0) -> torch.Tensor:
    """``(scores + bias) * scale`` (same shape as ``scores``). ``scale`` multiplies — pass 1/std to
    get unit variance."""
    return (scores + bias) * scale


# --------------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the sampled tokens' logprobs (``[B, T]`` each).

    With ``d = logπ - logπ_ref`` (tokens sampled from π):

    * ``"k1"``: ``d`` — unbiased, can be negative per token (InstructGPT / Ziegler et al.).
    * ``"k2"``: ``d² / 2``.
    * ``"k3"``: ``(r - 1) - log r`` with ``r = π_ref / π = exp(-d)`` — unbiased and always ≥ 0.
    * ``"abs"``: ``|d|``.
    """
    d = logprobs - ref_logprobs
    if kl_estimator == "k1":
        return d
    if kl_estimator == "k2":
        return 0.5 * d * d
    if kl_estimator == "k3":
        return torch.expm1(-d) + d  # (exp(-d) - 1) - (-d)
    if kl_estimator == "abs":
        return d.abs()
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    beta: float,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: ``-β · kl_t`` on response tokens, plus the RM score on the last one.

    Args:
        logprobs: ``[B, T]`` logπ of the sampled tokens under the policy that generated them.
        ref_logprobs: ``[B, T]`` logπ_ref of the same tokens under the frozen reference (SFT) model.
        mask: ``[B, T]`` response-token mask.
        scores: ``[B]`` sequence-level reward (already normalised, see :func:`normalize_rewards`).
        beta: KL coefficient (e.g. ``kl_controller.value``).
        kl_estimator: see :func:`kl_per_token`.

    Returns:
        ``(rewards [B, T], kl [B, T])``, both zero outside the mask. ``scores[b]`` is added at
        :func:`last_token_index` of row b; a row with an empty mask gets nothing. Not detached:
        pass detached inputs (experience is data, not graph).
    """
    m = _as_float_mask(mask, logprobs) != 0
    kl = kl_per_token(logprobs, ref_logprobs, kl_estimator)
    kl = torch.where(m, kl, torch.zeros_like(kl))  # padding logprobs may be -inf/NaN
    rewards = -beta * kl
    last = last_token_index(mask)
    has_tokens = last >= 0
    bonus = torch.zeros_like(rewards)
    bonus.scatter_(
        1,
        last.clamp(min=0).unsqueeze(1),
        (scores.to(rewards.dtype) * has_tokens.to(rewards.dtype)).unsqueeze(1),
    )
    return rewards + bonus, kl


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

    Args:
        rewards: ``[B, T]`` per-token rewards (e.g. from :func:`kl_penalized_rewards`).
        values: ``[B, T]`` value estimates V(s_t) at the same positions (old values).
        mask: ``[B, T]`` response-token mask; may start anywhere and rows may be left/right padded.
        gamma, lam: discount and GAE λ.

    The masked tokens of a row, in order, are the episode's steps (unmasked positions in between are
    skipped, not treated as episode ends); the value after the last masked token is 0 (terminal):
    ``δ_t = r_t + γ V(next masked) - V_t``, ``A_t = δ_t + γλ A(next masked)``.
    Rewards and values outside the mask are ignored.

    Returns:
        ``(advantages [B, T], returns [B, T])`` with ``returns = advantages + values``, both zero
        outside the mask, computed without gradient. Whiten advantages afterwards if wanted
        (:func:`masked_whiten`).
    """
    m = mask.to(device=values.device) > 0
    rewards = rewards.to(values.dtype)
    B, T = values.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in range(T - 1, -1, -1):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(mt, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(mt, values[:, t], next_value)
        next_adv = torch.where(mt, adv_t, next_adv)
    zeros = torch.zeros_like(values)
    returns = torch.where(m, advantages + values, zeros)
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    loss_norm: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (to minimise) — also the objective of GRPO, RLOO and REINFORCE++,
    which differ from PPO only in their advantages.

    ``ratio = exp(logπ - logπ_old)``; per token ``max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))``;
    averaged over the response tokens with :func:`loss_mean` (``loss_norm``: ``"token"`` = masked mean
    over all response tokens of the batch, ``"sequence"`` = mean over responses of their token means).

    Args:
        logprobs: ``[B, T]`` current policy logprobs (carries the gradient).
        old_logprobs: ``[B, T]`` logprobs at rollout time (detached here).
        advantages: ``[B, T]`` (detached here).
        mask: ``[B, T]`` response mask.
        clip_eps: ε.

    Returns:
        ``(loss, stats)``: 0-d tensor; stats (Python floats, masked means):

        * ``clipfrac``: fraction of tokens where the clipped term is the larger one (strictly), i.e.
          where the token's gradient is zeroed by clipping.
        * ``approx_kl``: mean of ``(ratio - 1) - log ratio`` — the non-negative k3 estimator of
          KL(π_old || π) from tokens sampled by π_old.
        * ``ratio_mean``: mean ratio.
    """
    old_logprobs = old_logprobs.detach()
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = loss_mean(torch.maximum(pg1, pg2), mask, loss_norm)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((pg2 > pg1).float(), mask)),
            "approx_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, stats


LOSS_NORMS = ("token", "sequence")


def loss_mean(x: torch.Tensor, mask: torch.Tensor, loss_norm: str = "token") -> torch.Tensor:
    """Average a per-token loss ``x`` ``[B, T]`` over the response tokens (0-d tensor).

    * ``"token"``: ``sum(x·m) / sum(m)`` — every token of the batch weighs the same (DAPO, Dr. GRPO).
    * ``"sequence"``: ``mean_b( sum_t(x·m) / sum_t(m) )`` over rows with at least one token — every
      response weighs the same, so a token of a long response weighs less (the GRPO paper's form).
    """
    if loss_norm == "token":
        return masked_mean(x, mask)
    if loss_norm == "sequence":
        m = _as_float_mask(mask, x)
        rows = (m.sum(dim=1) > 0).to(m.dtype)  # [B]
        return (masked_mean(x, m, dim=1) * rows).sum() / rows.sum().clamp(min=1.0)
    raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {loss_norm!r}")


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: masked mean of ``0.5 · max((v - R)², (v_clip - R)²)``.

    ``v_clip = v_old + clip(v - v_old, -ε, ε)``.

    Args:
        values: ``[B, T]`` current value predictions (carries the gradient).
        old_values: ``[B, T]`` values at rollout time (detached here).
        returns: ``[B, T]`` GAE returns (detached here).
        mask: ``[B, T]`` response mask.
        clip_eps: ε, in reward units.

    Returns:
        ``(loss, stats)`` with ``stats["vf_clipfrac"]`` = fraction of tokens where the clipped error
        is strictly larger (Python float).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err1 = (values - returns) ** 2
    err2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err1, err2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": float(masked_mean((err2 > err1).float(), mask))}
    return loss, stats


class AdaptiveKLController:
    """Adaptive KL coefficient β (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``β ← β · (1 + e · n_steps / horizon)``.
    ``current_kl`` is the mean per-sequence KL (sum over response tokens), same units as ``target``.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be > 0")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the observed KL after ``n_steps`` (e.g. episodes in the batch); returns β."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * float(n_steps) / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant β with the same interface as :class:`AdaptiveKLController` (``update`` is a no-op)."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------------
# critic-free RL: GRPO, RLOO, REINFORCE++ (with baseline)
# --------------------------------------------------------------------------------------------------

GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp")


def group_ids(keys: Sequence) -> torch.Tensor:
    """``[B]`` long: the index of each row's key in order of first appearance (``["a", "b", "a"]`` →
    ``[0, 1, 0]``). Rows with the same prompt form one group, wherever they sit in the batch."""
    first: dict = {}
    return torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)


def group_advantages(scores: torch.Tensor, groups: torch.Tensor, estimator: str, eps: float = 1e-6
                     ) -> torch.Tensor:
    """Sequence-level advantages from the other responses to the same prompt — the baseline a value
    model would otherwise supply.

    Args:
        scores: ``[B]`` rewards of the responses.
        groups: ``[B]`` long, the prompt (group) of each response (:func:`group_ids`).
        estimator, with ``n`` the group's size, ``mean``/``std`` its reward mean and unbiased std:

            * ``"grpo"`` (Shao et al. 2024): ``(r - mean) / (std + eps)``;
            * ``"rloo"`` (Ahmadian et al. 2024): ``r - (sum - r) / (n - 1)``, the mean of the *other*
              responses, so the baseline is independent of the response it judges;
            * ``"reinforce_pp"`` (REINFORCE++ with baseline, Hu 2025): ``r - mean``; the global batch
              normalisation of REINFORCE++ comes after the KL shaping (:func:`masked_whiten`).

    Returns:
        ``[B]``. A group of one response has no baseline: its advantage is 0 (it teaches nothing),
        as is every advantage of a group whose rewards are all equal.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {GROUP_ESTIMATORS}, got {estimator!r}")
    r = scores.to(torch.float64)
    g = groups.to(device=r.device, dtype=torch.long)
    k = int(g.max()) + 1 if g.numel() else 0
    n = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))[g]  # [B]
    total = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, g, r)[g]
    mean = total / n
    alone = n < 2
    if estimator == "rloo":
        adv = r - (total - r) / (n - 1).clamp(min=1.0)
    else:
        adv = r - mean
        if estimator == "grpo":
            sq = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, g, (r - mean) ** 2)[g]
            std = (sq / (n - 1).clamp(min=1.0)).sqrt()
            adv = adv / (std + eps)
    return torch.where(alone, torch.zeros_like(adv), adv).to(scores.dtype)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = sum_{s >= t} γ^(s-t) r_s`` over the masked tokens of each row (``[B, T]``, 0 off the mask):
    the advantage of REINFORCE-style methods when the KL penalty is part of the per-token reward. It is
    :func:`gae` with no value model (V = 0) and λ = 1."""
    return gae(rewards, torch.zeros(rewards.shape, dtype=torch.float32, device=rewards.device), mask, gamma, 1.0)[0]


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_estimator: str = "k3",
            loss_norm: str = "token") -> torch.Tensor:
    """KL(π || π_ref) as a loss term (GRPO): :func:`kl_per_token` of the *current* logprobs (carrying the
    gradient) against the reference, averaged with :func:`loss_mean`. Multiply by β and add to the
    policy loss. k3 is GRPO's choice: unbiased, never negative, and its gradient pulls towards π_ref."""
    kl = kl_per_token(logprobs, ref_logprobs.detach(), kl_estimator)
    m = _as_float_mask(mask, logprobs) != 0
    return loss_mean(torch.where(m, kl, torch.zeros_like(kl)), mask, loss_norm)


# --------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------

DPO_LOSSES = ("sigmoid", "ipo")


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """Every (preferred, rejected) pair a K-way ranking (response indices, best first) implies, C(K,2) of
    them: ``[2, 0, 1]`` → ``[(2, 0), (2, 1), (0, 1)]``."""
    r = list(ranking)
    return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0, loss: str = "sigmoid"
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct preference optimisation (Rafailov et al. 2023) on one preference pair per row.

    Args:
        chosen_logps, rejected_logps: ``[B]`` summed response logprobs under the policy (with gradient).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference.
        beta: β > 0, the strength of the implicit KL constraint.
        label_smoothing: ε, the probability that a label is flipped (conservative DPO):
            ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``.
        loss: ``"sigmoid"`` (DPO) or ``"ipo"`` (Azar et al. 2023): ``(h - 1/(2β))²``, which stops
            pushing once the margin reaches ``1/(2β)`` instead of driving it to infinity.

    With ``h = (logπ(y_w) - logπ_ref(y_w)) - (logπ(y_l) - logπ_ref(y_l))``. Returns ``(loss, stats)``,
    loss the mean over rows; stats: ``accuracy`` (h > 0), ``margin`` (mean β·h), ``chosen_reward`` and
    ``rejected_reward`` (means of the implicit rewards β·(logπ - logπ_ref)).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss not in DPO_LOSSES:
        raise ValueError(f"loss must be one of {DPO_LOSSES}, got {loss!r}")
    chosen = chosen_logps - ref_chosen_logps.detach()
    rejected = rejected_logps - ref_rejected_logps.detach()
    h = chosen - rejected
    if loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    with torch.no_grad():
        stats = {"accuracy": float((h > 0).float().mean()), "margin": float((beta * h).mean()),
                 "chosen_reward": float((beta * chosen).mean()), "rejected_reward": float((beta * rejected).mean())}
    return losses.mean(), stats


# --------------------------------------------------------------------------------------------------
# the logprob consistency gate
# --------------------------------------------------------------------------------------------------


def logprob_gate(recomputed: torch.Tensor, served: torch.Tensor, mask: torch.Tensor, same_version: torch.Tensor
                 ) -> dict[str, float]:
    """How far the trainer's logprobs of sampled tokens are from what the sampler returned, on samples the
    sampler drew with *the same weights* the trainer holds (staleness is not a disagreement).

    Args:
        recomputed, served: ``[B, T]`` logprobs of the sampled tokens (trainer forward, policy-inference).
        mask: ``[B, T]`` response mask.
        same_version: ``[B]`` bool, rows sampled by the trainer's current version.

    Returns:
        ``gate_max`` (max |difference|, nats), ``gate_mean`` (mean over tokens) and ``gate_tokens`` (how
        many tokens were compared; 0 → both statistics 0).
    """
    m = (_as_float_mask(mask, recomputed) != 0) & same_version.to(recomputed.device).bool()[:, None]
    n = int(m.sum())
    if n == 0:
        return {"gate_max": 0.0, "gate_mean": 0.0, "gate_tokens": 0.0}
    d = (recomputed.detach().double() - served.detach().double()).abs()[m]
    return {"gate_max": float(d.max()), "gate_mean": float(d.mean()), "gate_tokens": float(n)}
