"""Stage 3a — the reward model: learn human rankings with a Bradley–Terry loss.

Rankings come from ``data.rankings_file`` (people, e.g. the feedback service's export), are handed in
(the pipeline collects them through the feedback service), or — standalone, ``chatrl train reward`` —
come through the one label path (``services/trainer/labels.py``) over the in-process feedback store:
the SFT policy samples K responses per prompt and the *simulated labelers* (a noisy gold preference
function, a stand-in for people) rank them. The reward model never sees the gold function, only these
rankings. All C(K,2) pairs of one prompt form one batch element (InstructGPT), less the pairs a labeler
tied (they state no preference). A prompt that is a conversation (``Ranking.messages``, from the labeling
app's chat-then-compare) is rendered with the tokenizer's chat template, as the policy saw it. The
standalone path's :class:`~labels.LocalLabels` samples single-turn prompts only. The RM starts from the
SFT weights with a fresh scalar head and trains in the shared supervised loop (resumable); after
training, a bias is set so the scores of the ranked responses average 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from chatrl.services.core.checkpoint import Checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.feedback_store import FeedbackStore, untied_pairs
from chatrl.services.core.formats import Ranking, load_pairs, load_prompts, load_rankings
from chatrl.services.core.model import GPT
from chatrl.services.core.scoring import last_token_scalar, pair_ids
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos, labels
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    check_run_model,
    model_from_checkpoint,
    previous_stage,
    run_dir,
    tokenizer_from_checkpoint,
    with_lora,
)
from chatrl.services.trainer.stages.data import resolve_data
from chatrl.services.trainer.stages.supervised import (
    Schedule,
    SupervisedTask,
    finished,
    shuffled_batch,
    train,
)

STAGE = "reward"


Encoded = tuple[list[list[int]], list[int], list[bool]]  # (K token-id sequences, ranking, tied_with_next)


def encode_rankings(tok: ChatTokenizer, rankings: list[Ranking], max_len: int) -> list[Encoded]:
    """Each response after its prompt — a conversation rendered with the tokenizer's chat template — with
    the ranking and its ties."""
    return [([pair_ids(tok, r.chat, resp, fin, max_len) for resp, fin in zip(r.responses, r.finished)],
             r.ranking, list(r.tied_with_next) or [False] * (len(r.ranking) - 1)) for r in rankings]


def rm_batch_loss(model: GPT, batch: list[Encoded], pad_id: int, cfg: RunConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores every response of every prompt in one forward; BT loss over all untied pairs per prompt."""
    k = max(len(seqs) for seqs, _, _ in batch)
    flat = [s for seqs, _, _ in batch for s in seqs]
    scores = last_token_scalar(model, flat, pad_id, cfg.dtype, cfg.device)
    rewards = torch.zeros(len(batch), k, device=scores.device)
    ranking = torch.full((len(batch), k), -1, dtype=torch.long, device=scores.device)
    tied = torch.zeros(len(batch), k - 1, dtype=torch.bool, device=scores.device)
    pos = 0
    for i, (seqs, rk, ties) in enumerate(batch):
        rewards[i, : len(seqs)] = scores[pos: pos + len(seqs)]
        ranking[i, : len(rk)] = torch.tensor(rk)
        tied[i, : len(ties)] = torch.tensor(ties, dtype=torch.bool)
        pos += len(seqs)
    loss, acc = algos.ranking_loss(rewards, ranking, tied)
    return loss, acc, scores


class RewardModelTask(SupervisedTask):
    """Bradley–Terry loss over every pair of each ranking; eval = loss and pairwise accuracy held out.
    Finally the bias that centres the scores of all ranked responses at 0."""

    eval_before = True

    def __init__(self, stage: str, cfg: RunConfig, tok: ChatTokenizer, train_set: list, held: list,
                 num_rankings: int) -> None:
        self.stage, self.cfg, self.tok, self.train, self.held = stage, cfg, tok, train_set, held
        self.num_rankings = num_rankings

    def batch(self, step: int) -> list:
        idx = shuffled_batch(len(self.train), step, self.cfg.reward.batch_size,
                             derive_seed(self.cfg.seed, self.stage), drop_last=False)
        return [self.train[i] for i in idx]

    def loss(self, model: GPT, batch: list) -> tuple[torch.Tensor, dict[str, float], int]:
        loss, acc, _ = rm_batch_loss(model, batch, self.tok.pad_id, self.cfg)
        return loss, {"accuracy": float(acc)}, sum(len(s) for seqs, _, _ in batch for s in seqs)

    def evaluate(self, model: GPT) -> dict[str, float]:
        loss, acc = evaluate(model, self.held, self.tok, self.cfg)
        return {"eval_loss": loss, "eval_accuracy": acc}

    def finish(self, model: GPT, metrics: dict[str, float]) -> tuple[dict[str, float], dict]:
        loss, acc, scores = evaluate(model, self.held + self.train, self.tok, self.cfg, return_scores=True)
        bias = algos.reward_bias(torch.tensor(scores))
        return ({"train_loss": loss, "train_accuracy": acc, "reward_bias": bias},
                {"reward_bias": bias, "num_rankings": self.num_rankings})

    def summary(self, m: dict[str, float]) -> str:
        return (f"{self.stage}: done, held-out pairwise accuracy {m['eval_accuracy_before']:.3f} → "
                f"{m['eval_accuracy']:.3f}, bias {m['reward_bias']:+.3f}")


def run(cfg: RunConfig, reporter: Reporter | None = None, init: str | None = None,
        rankings: list[Ranking] | None = None, stage: str = STAGE) -> StageResult:
    """Train a reward model. ``rankings`` may be passed in (the pipeline collects them through the
    feedback service); otherwise ``data.rankings_file``, else fresh labels through the in-process store."""
    reporter = reporter or Reporter()
    rc = cfg.reward
    if (done := finished(cfg, stage, reporter)) is not None:
        return done
    check_run_model(cfg)
    base = previous_stage(cfg, "sft", init)
    tok = tokenizer_from_checkpoint(base)
    if rankings is None:
        rankings = get_rankings(cfg, base, tok, stage, reporter)
    if cfg.data.pairs_file:
        rankings = rankings + [Ranking(p["prompt"], [p["chosen"], p["rejected"]], [0, 1], p["finished"],
                                       messages=p["messages"]) for p in load_pairs(Path(cfg.data.pairs_file))]
    if len(rankings) < 2:
        raise ValueError(f"reward model needs at least 2 rankings, got {len(rankings)}")
    torch.manual_seed(derive_seed(cfg.seed, stage, "init"))  # the fresh scalar head depends on the seed only
    model = with_lora(cfg, model_from_checkpoint(base, scalar_head=True, device=cfg.device))
    enc = encode_rankings(tok, rankings, model.cfg.max_seq_len)
    perm = torch.randperm(len(enc), generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, stage, "held-out"))).tolist()
    n_eval = max(1, int(len(enc) * rc.eval_fraction))
    held = [enc[i] for i in perm[:n_eval]]
    train_set = [enc[i] for i in perm[n_eval:]]
    steps_per_epoch = max(1, math.ceil(len(train_set) / rc.batch_size))
    total = max(1, rc.epochs) * steps_per_epoch
    # warmup 5% of the steps, cosine to 10% of lr; a resumable checkpoint after every epoch but the last
    sched = Schedule(total, rc.lr, max(1, total // 20), 0.1, rc.weight_decay, rc.grad_clip, rc.log_every,
                     ckpt_every=steps_per_epoch)
    pairs = sum(untied_pairs(len(r), t) for _, r, t in train_set)
    return train(cfg, RewardModelTask(stage, cfg, tok, train_set, held, len(rankings)), model, tok, sched,
                 reporter, on_start=lambda start: reporter.log(
                     f"{stage}: {len(train_set)} rankings ({pairs} pairs), {len(held)} held out, {total} steps"))


def get_rankings(cfg: RunConfig, base: Checkpoint, tok: ChatTokenizer, stage: str, reporter: Reporter
                 ) -> list[Ranking]:
    """``data.rankings_file``, else fresh rankings of the SFT model's samples through the label path over
    the in-process feedback store (``<run_dir>/feedback.db``; snapshot ``<run_dir>/data/rankings_<stage>.jsonl``)."""
    if cfg.data.rankings_file:
        return load_rankings(Path(cfg.data.rankings_file))
    data = resolve_data(cfg)
    gold = None
    if data.gold is not None:
        from chatrl.services.core.gold import GoldLabeler

        gold = GoldLabeler.load(data.gold)
    out = run_dir(cfg) / "data" / f"rankings_{stage}.jsonl"
    with FeedbackStore(run_dir(cfg) / "feedback.db") as store:
        local = labels.LocalLabels(store, model_from_checkpoint(base, device=cfg.device), tok, cfg)
        return labels.collect_rankings(cfg, local, load_prompts(data.prompts), gold, stage, out, reporter)


def evaluate(model: GPT, held: list, tok: ChatTokenizer, cfg: RunConfig, return_scores: bool = False):
    """(mean BT loss, pairwise accuracy[, raw scores of every response]) over the given rankings
    (the loop sets eval mode and no_grad)."""
    losses, accs, weights, scores = [], [], [], []
    for i in range(0, len(held), 16):
        batch = held[i: i + 16]
        loss, acc, sc = rm_batch_loss(model, batch, tok.pad_id, cfg)
        losses.append(float(loss))
        accs.append(float(acc))
        weights.append(len(batch))
        scores += sc.tolist()
    w = np.asarray(weights, dtype=float)
    res = (float(np.average(losses, weights=w)), float(np.average(accs, weights=w)))
    return (*res, scores) if return_scores else res
