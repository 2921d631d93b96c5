"""Stage 2 — supervised fine-tuning on human demonstrations; the loss covers assistant tokens only.

Starts from the final pre-training checkpoint. Each epoch visits the conversations in a permutation
drawn from (seed, epoch), so the data position is just the step and resume is exact.
"""

from __future__ import annotations

import torch

from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import load_sft
from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    check_run_model,
    model_from_checkpoint,
    previous_stage,
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

STAGE = "sft"


def encode_conversations(tok: ChatTokenizer, convs: list[list[dict]], max_len: int
                         ) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation, truncated to max_len; those left without any
    assistant token are dropped."""
    out = []
    for conv in convs:
        ids, mask = tok.render_chat(conv)
        ids, mask = ids[:max_len], mask[:max_len]
        if sum(mask[1:]) > 0:
            out.append((ids, mask))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, loss_mask) [B, T]."""
    t = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    att = torch.zeros(len(examples), t, dtype=torch.long)
    lm = torch.zeros(len(examples), t, dtype=torch.float32)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        lm[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, att, lm


def sft_loss(model: GPT, ids: torch.Tensor, att: torch.Tensor, lm: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Cross-entropy of the assistant tokens: ids/att/lm [B, T] (lm = 1 on assistant tokens)."""
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        logits = model(ids[:, :-1], att[:, :-1]).logits  # [B, T-1, V]
    return algos.lm_loss(logits.float(), ids[:, 1:], lm[:, 1:])


class SFTTask(SupervisedTask):
    """Assistant-token loss over the demonstrations, epoch by epoch; eval = the same loss held out."""

    stage = STAGE
    eval_before = True

    def __init__(self, cfg: RunConfig, tok: ChatTokenizer, train: list, held: list) -> None:
        self.cfg, self.tok, self.train, self.held = cfg, tok, train, held

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        idx = shuffled_batch(len(self.train), step, self.cfg.sft.batch_size, derive_seed(self.cfg.seed, STAGE),
                             drop_last=True)
        return tuple(t.to(self.cfg.device) for t in collate([self.train[i] for i in idx], self.tok.pad_id))

    def loss(self, model: GPT, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float], int]:
        ids, att, lm = batch
        return sft_loss(model, ids, att, lm, self.cfg), {}, int(att.sum())

    def evaluate(self, model: GPT) -> dict[str, float]:
        tot, n = 0.0, 0.0
        for i in range(0, len(self.held), 32):
            ids, att, lm = (t.to(self.cfg.device) for t in collate(self.held[i: i + 32], self.tok.pad_id))
            w = float(lm[:, 1:].sum())  # assistant tokens predicted
            tot += float(sft_loss(model, ids, att, lm, self.cfg)) * w
            n += w
        return {"eval_loss": tot / max(n, 1.0)}

    def summary(self, m: dict[str, float]) -> str:
        return (f"sft: done, held-out assistant-token loss {m.get('eval_loss_before', float('nan')):.3f}"
                f" → {m['eval_loss']:.3f}")


def run(cfg: RunConfig, reporter: Reporter | None = None, init: str | None = None) -> StageResult:
    reporter = reporter or Reporter()
    sc = cfg.sft
    if (done := finished(cfg, STAGE, reporter)) is not None:
        return done
    check_run_model(cfg)
    base = previous_stage(cfg, "pretrain", init)
    tok = tokenizer_from_checkpoint(base)
    model = with_lora(cfg, model_from_checkpoint(base, device=cfg.device))
    data = encode_conversations(tok, load_sft(resolve_data(cfg).sft), min(sc.max_len, model.cfg.max_seq_len))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, STAGE, "held-out"))).tolist()
    n_eval = max(1, min(200, len(data) // 20))
    held = [data[i] for i in perm[:n_eval]]
    train_set = [data[i] for i in perm[n_eval:]]
    sched = Schedule(sc.steps, sc.lr, sc.warmup_steps, sc.min_lr_ratio, sc.weight_decay, sc.grad_clip,
                     sc.log_every, sc.ckpt_every)
    return train(cfg, SFTTask(cfg, tok, train_set, held), model, tok, sched, reporter,
                 on_start=lambda start: reporter.log(
                     f"sft: {len(train_set)} conversations ({len(held)} held out), {sc.steps} steps × "
                     f"{sc.batch_size}"))
