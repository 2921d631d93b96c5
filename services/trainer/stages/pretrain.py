"""Stage 1 — generative pre-training: next-token prediction on raw text.

Batches are a deterministic function of (seed, step): random windows of ``seq_len + 1`` tokens from
the concatenated corpus (documents joined by ``<|endoftext|>``), so a resumed run sees exactly the
batches an uninterrupted one would. The data position stored in checkpoints is the step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from chatrl.services.core.checkpoint import atomic_write_bytes
from chatrl.services.core.config import RunConfig
from chatrl.services.core.formats import read_corpus
from chatrl.services.core.model import GPT, GPTConfig, autocast
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import (
    Reporter,
    StageResult,
    Throughput,
    latest_checkpoint,
    lr_at,
    make_optimizer,
    run_dir,
    save_stage,
    stage_dir,
    stage_done,
)
from chatrl.services.trainer.stages.data import resolve_data

STAGE = "pretrain"


def build_tokenizer(cfg: RunConfig, reporter: Reporter) -> ChatTokenizer:
    """Load the configured tokenizer, the run's own, or train a byte-level BPE on the corpora."""
    if cfg.tokenizer.path:
        return ChatTokenizer.load(cfg.tokenizer.path)
    path = run_dir(cfg) / "tokenizer.json"
    if path.exists():
        return ChatTokenizer.load(path)
    paths = resolve_data(cfg)
    docs = read_corpus(paths.pretrain)
    from chatrl.services.core.formats import load_sft

    chats = [" ".join(m["content"] for m in conv) for conv in load_sft(paths.sft)]
    t0 = time.perf_counter()
    tok = ChatTokenizer.train(docs + chats, vocab_size=cfg.tokenizer.vocab_size)
    reporter.log(f"trained BPE tokenizer: vocab {tok.vocab_size} in {time.perf_counter() - t0:.1f}s")
    tok.save(path)
    return tok


def corpus_tokens(cfg: RunConfig, tok: ChatTokenizer) -> np.ndarray:
    """The tokenised corpus, cached in the run directory (.npy, never pickled)."""
    cache = run_dir(cfg) / "data" / "pretrain_tokens.npy"
    if cache.exists():
        return np.load(cache, allow_pickle=False)
    docs = read_corpus(resolve_data(cfg).pretrain)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc)
        ids.append(tok.eot_id)
    arr = np.asarray(ids, dtype=np.int32)
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(cache, buf.getvalue())
    return arr


def batch_at(tokens: torch.Tensor, step: int, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
    return torch.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()]).long()


def run(cfg: RunConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or Reporter()
    pc = cfg.pretrain
    root = stage_dir(cfg, STAGE)
    done = stage_done(root)
    if done is not None:
        reporter.log(f"pretrain: already finished ({done.path})")
        return StageResult(STAGE, done.path, done.manifest["meta"].get("metrics", {}))
    tok = build_tokenizer(cfg, reporter)
    if cfg.model.vocab_size != tok.vocab_size:
        cfg.model.vocab_size = tok.vocab_size
    if pc.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"pretrain.seq_len ({pc.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    data = torch.from_numpy(corpus_tokens(cfg, tok).astype(np.int64))
    n_eval = max(pc.seq_len * 8, len(data) // 50)
    train, held = data[:-n_eval], data[-n_eval:]
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = GPT(GPTConfig(**cfg.model.to_dict())).to(cfg.device)
    opt = make_optimizer(model, pc.lr, pc.weight_decay)
    start = 0
    ck = latest_checkpoint(root)
    if ck is not None:
        model.load_state_dict(ck.model_state(cfg.device))
        if (opt_state := ck.optimizer_state()) is not None:
            opt.load_state_dict(opt_state)
        ck.restore_rng()
        start = ck.step
        reporter.log(f"pretrain: resuming from step {start} ({ck.path.name})")
    reporter.log(f"pretrain: {model.num_params() / 1e6:.2f}M params, corpus {len(train):,} tokens, "
                 f"{pc.steps} steps × {pc.batch_size}×{pc.seq_len}")
    model.train()
    thr = Throughput()
    t0 = time.perf_counter()
    reporter.start(STAGE, pc.steps, start)
    metrics: dict[str, float] = {}
    loss_acc, n_acc = 0.0, 0
    for step in range(start, pc.steps):
        reporter.check_cancelled()
        lr = lr_at(step, pc.steps, pc.lr, pc.warmup_steps, pc.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        xb = batch_at(train, step, cfg.seed, pc.batch_size, pc.seq_len).to(cfg.device)
        with autocast(cfg.dtype, cfg.device.split(":")[0]):
            logits = model(xb[:, :-1]).logits
        loss = algos.lm_loss(logits.float(), xb[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip)
        opt.step()
        thr.add(xb[:, :-1].numel())
        loss_acc += loss.item()
        n_acc += 1
        s = step + 1
        reporter.progress(STAGE, s, pc.steps)
        if s % pc.log_every == 0 or s == pc.steps:
            metrics = {"loss": loss_acc / n_acc, "lr": lr, "grad_norm": float(gn), "tokens_per_s": thr.rate()}
            loss_acc, n_acc = 0.0, 0
            reporter.metrics(STAGE, s, pc.steps, metrics)
        if s % pc.ckpt_every == 0 and s < pc.steps:
            save_stage(cfg, STAGE, s, model, tok, opt, {"data_position": s})
    metrics["eval_loss"] = evaluate(model, held, cfg)
    metrics["tokens_per_s"] = thr.rate()
    metrics["seconds"] = time.perf_counter() - t0
    reporter.metrics(STAGE, pc.steps, pc.steps, metrics)
    reporter.finish(STAGE)
    ck = save_stage(cfg, STAGE, pc.steps, model, tok, None, {"data_position": pc.steps, "metrics": metrics},
                    final=True)
    reporter.log(f"pretrain: done, eval loss {metrics['eval_loss']:.3f}, {metrics['tokens_per_s']:.0f} tokens/s")
    return StageResult(STAGE, ck.path, metrics, metrics["seconds"])


@torch.no_grad()
def evaluate(model: GPT, held: torch.Tensor, cfg: RunConfig, max_batches: int = 8) -> float:
    model.eval()
    sl = cfg.pretrain.seq_len
    n = min(max_batches * cfg.pretrain.batch_size, (len(held) - 1) // sl)
    xs = torch.stack([held[i * sl: i * sl + sl + 1] for i in range(n)]).long().to(cfg.device)
    losses = []
    for i in range(0, n, cfg.pretrain.batch_size):
        xb = xs[i: i + cfg.pretrain.batch_size]
        with autocast(cfg.dtype, cfg.device.split(":")[0]):
            logits = model(xb[:, :-1]).logits
        losses.append(float(algos.lm_loss(logits.float(), xb[:, 1:])))
    model.train()
    return float(np.mean(losses))
