"""DPO — Direct Preference Optimisation (Rafailov et al. 2023) from the same K-way rankings the reward
model learns from, as ``pipeline.method: dpo``: it replaces reward model + RL in a round.

Every ranking of K responses gives its C(K,2) (preferred, rejected) pairs, less those a labeler tied
(:meth:`Ranking.pairs`).
The reference — the frozen SFT model — scores each response once, before training (its logprobs never
change): through the reference-model service in the pipeline (:func:`service_reference`), or a model in
this process (:func:`local_reference`). The policy then minimises :func:`algos.dpo_loss` (β, optional
label smoothing, or the IPO variant) in the one supervised loop (``stages/supervised.py``: batches of
pairs, resume, schedule, checkpoints). With ``pipeline.rounds`` > 1 DPO is iterative: each round's
rankings are of fresh samples of the current policy, collected through the feedback service by the one
label path. A standalone ``dpo`` stage ranks nothing itself: it takes rankings (``data.rankings_file``
or handed in) and the reference ``dpo.reference`` (default this run's ``sft`` stage).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import Ranking
from chatrl.services.core.model import GPT
from chatrl.services.core.scoring import pair_ids
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.experience import Experience, make_batch
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    model_from_checkpoint,
    previous_stage,
    tokenizer_from_checkpoint,
)
from chatrl.services.trainer.stages.ppo import policy_forward
from chatrl.services.trainer.stages.supervised import (
    Schedule,
    SupervisedTask,
    finished,
    shuffled_batch,
    train,
)

# (token ids of prompt+response per sequence, where each response starts) → summed response logprob each
RefLogprobs = Callable[[list[list[int]], list[int]], list[float]]

Seq = tuple[list[int], int]  # (prompt+response ids, response start)
Pair = tuple[Seq, Seq, float, float]  # (chosen, rejected, reference logprob of chosen, of rejected)


def stage_name(round_: int) -> str:
    return f"dpo_r{round_}"


def local_reference(model: GPT, cfg: RunConfig, pad_id: int, batch: int = 32) -> RefLogprobs:
    """The reference model in this process (tests, the benchmark, a standalone stage)."""
    from chatrl.services.core.generate import sequence_logprobs

    @torch.no_grad()
    def ref(seqs: list[list[int]], starts: list[int]) -> list[float]:
        model.eval()
        out: list[float] = []
        for i in range(0, len(seqs), batch):
            lps = sequence_logprobs(model, seqs[i: i + batch], pad_id, 1.0, cfg.dtype, cfg.device)
            out += [float(sum(lp[s:])) for lp, s in zip(lps, starts[i: i + batch])]
        return out

    return ref


def service_reference(client, batch: int = 64) -> RefLogprobs:
    """The reference-model service's ``LogProbs`` (a ReferenceClient or ReplicaGroup; the pipeline loaded
    the SFT checkpoint into it)."""

    def ref(seqs: list[list[int]], starts: list[int]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(seqs), batch):
            lps, _ = client.logprobs(seqs[i: i + batch], starts[i: i + batch], temperature=1.0)
            out += [float(lp.sum()) for lp in lps]
        return out

    return ref


def encode_pairs(tok: ChatTokenizer, rankings: list[Ranking], max_len: int, reference: RefLogprobs) -> list[list[Pair]]:
    """Per ranking, its C(K,2) pairs less the tied ones, with the reference's logprobs; a response without
    tokens (empty and unfinished) leaves its pairs out. Returns one list per ranking (held-out splits keep a prompt's pairs
    together)."""
    seqs: list[list[Seq]] = []
    for r in rankings:
        row = []
        for resp, fin in zip(r.responses, r.finished):
            ids = pair_ids(tok, r.chat, resp, fin, max_len)  # a conversation: the chat template
            n_resp = min(len(tok.encode(resp)) + (1 if fin else 0), len(ids) - 1)
            row.append((ids, len(ids) - n_resp))
        seqs.append(row)
    flat = [s for row in seqs for s in row if s[1] < len(s[0])]
    ref = dict(zip(((tuple(i), st) for i, st in flat), reference([i for i, _ in flat], [st for _, st in flat])))
    out = []
    for r, row in zip(rankings, seqs):
        pairs = []
        for w, lo in r.pairs():  # tied responses form no pair
            (cw, sw), (cl, sl) = row[w], row[lo]
            if sw < len(cw) and sl < len(cl):
                pairs.append(((cw, sw), (cl, sl), ref[(tuple(cw), sw)], ref[(tuple(cl), sl)]))
        out.append(pairs)
    return out


def pair_logps(model: GPT, pairs: list[Pair], pad_id: int, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response logprobs under ``model`` of the chosen and the rejected responses ([B] each), in one
    forward of the 2B sequences (the RL loop's :func:`policy_forward` at temperature 1)."""
    exps = [Experience("", ids[:st], ids[st:], [0.0] * (len(ids) - st), [0.0] * (len(ids) - st), 0.0, True, 0)
            for c, r, _, _ in pairs for ids, st in (c, r)]
    b = make_batch(exps, pad_id)
    b.ids, b.att, b.mask = b.ids.to(cfg.device), b.att.to(cfg.device), b.mask.to(cfg.device)
    lp, _ = policy_forward(model, b, cfg, 1.0, entropy_grad=False)
    logps = (lp * b.mask).sum(dim=1)  # [2B]
    return logps[0::2], logps[1::2]


class DPOTask(SupervisedTask):
    """Batches of pairs; the DPO (or IPO) loss against the reference; eval = loss and preference accuracy
    on the held-out rankings' pairs."""

    eval_before = True

    def __init__(self, stage: str, cfg: RunConfig, tok: ChatTokenizer, train_set: list[Pair], held: list[Pair]) -> None:
        self.stage, self.cfg, self.tok, self.train, self.held = stage, cfg, tok, train_set, held
        self.dc = cfg.dpo

    def batch(self, step: int) -> list[Pair]:
        idx = shuffled_batch(len(self.train), step, self.dc.batch_size, derive_seed(self.cfg.seed, self.stage),
                             drop_last=False)
        return [self.train[i] for i in idx]

    def _loss(self, model: GPT, batch: list[Pair]) -> tuple[torch.Tensor, dict[str, float]]:
        dc, dev = self.dc, self.cfg.device
        chosen, rejected = pair_logps(model, batch, self.tok.pad_id, self.cfg)
        ref_c = torch.tensor([p[2] for p in batch], device=dev)
        ref_r = torch.tensor([p[3] for p in batch], device=dev)
        return algos.dpo_loss(chosen, rejected, ref_c, ref_r, dc.beta, dc.label_smoothing, dc.loss)

    def loss(self, model: GPT, batch: list[Pair]) -> tuple[torch.Tensor, dict[str, float], int]:
        loss, stats = self._loss(model, batch)
        return loss, stats, sum(len(c[0]) + len(r[0]) for c, r, _, _ in batch)

    def evaluate(self, model: GPT) -> dict[str, float]:
        tot, acc, n = 0.0, 0.0, 0
        for i in range(0, len(self.held), 32):
            chunk = self.held[i: i + 32]
            loss, stats = self._loss(model, chunk)
            tot, acc, n = tot + float(loss) * len(chunk), acc + stats["accuracy"] * len(chunk), n + len(chunk)
        return {"eval_loss": tot / max(n, 1), "eval_accuracy": acc / max(n, 1)}

    def summary(self, m: dict[str, float]) -> str:
        return (f"{self.stage}: done, held-out preference accuracy {m.get('eval_accuracy_before', 0.0):.3f} → "
                f"{m['eval_accuracy']:.3f}")


def run(cfg: RunConfig, reporter: Reporter | None, init: str | None, rankings: list[Ranking],
        reference: RefLogprobs | None, round_: int = 0) -> StageResult:
    """DPO of the policy at ``init`` (default this run's SFT) on ``rankings`` against ``reference``."""
    reporter = reporter or Reporter()
    dc = cfg.dpo
    stage = stage_name(round_)
    if (done := finished(cfg, stage, reporter)) is not None:
        return done
    if reference is None:
        raise ValueError("dpo.reference: DPO needs the frozen reference model (the SFT checkpoint) to score "
                         "the ranked responses")
    base = previous_stage(cfg, "sft", init)
    tok = tokenizer_from_checkpoint(base)
    model = model_from_checkpoint(base, device=cfg.device)
    by_ranking = encode_pairs(tok, rankings, model.cfg.max_seq_len, reference)
    perm = torch.randperm(len(by_ranking), generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, stage, "held-out"))).tolist()
    n_eval = max(1, int(len(by_ranking) * dc.eval_fraction))
    held = [p for i in perm[:n_eval] for p in by_ranking[i]]
    train_set = [p for i in perm[n_eval:] for p in by_ranking[i]]
    if not train_set or not held:
        raise ValueError(f"DPO needs ranked pairs to train on and to hold out; got {len(train_set)} and {len(held)} "
                         f"from {len(rankings)} rankings")
    steps_per_epoch = max(1, math.ceil(len(train_set) / dc.batch_size))
    total = max(1, dc.epochs) * steps_per_epoch
    sched = Schedule(total, dc.lr, max(1, total // 20), 0.1, dc.weight_decay, dc.grad_clip, dc.log_every,
                     ckpt_every=steps_per_epoch)
    return train(cfg, DPOTask(stage, cfg, tok, train_set, held), model, tok, sched, reporter,
                 on_start=lambda start: reporter.log(
                     f"{stage}: {len(train_set)} pairs from {len(rankings) - n_eval} rankings ({len(held)} pairs "
                     f"held out), β {dc.beta}, {dc.loss}, {total} steps"))


def reference_from_config(cfg: RunConfig) -> RefLogprobs:
    """The standalone stage's reference: ``dpo.reference`` or this run's SFT, loaded in this process."""
    ck = previous_stage(cfg, "sft", cfg.dpo.reference or None)
    return local_reference(model_from_checkpoint(ck, device=cfg.device), cfg, tokenizer_from_checkpoint(ck).pad_id)
