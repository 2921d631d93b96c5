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
from chatrl.services.core.model import GPT, autocast
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.trainer import algos
from chatrl.services.trainer.stages.common import Reporter, StageResult, check_run_model, run_dir, save_stage
from chatrl.services.trainer.stages.data import resolve_data
from chatrl.services.trainer.stages.supervised import Schedule, SupervisedTask, finished, train

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


def random_windows(tokens: torch.Tensor, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` tokens, a pure function of ``seed``: [batch, seq_len + 1]."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch,), generator=g)
    return torch.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()]).long()


def batch_at(tokens: torch.Tensor, step: int, seed: int, batch: int, seq_len: int) -> torch.Tensor:
    """The pre-training batch of ``step``: [batch, seq_len + 1] token ids."""
    return random_windows(tokens, derive_seed(seed, STAGE, "batch", step), batch, seq_len)


class PretrainTask(SupervisedTask):
    """Next-token prediction on random windows of the corpus; eval = mean loss on the held-out tail."""

    stage = STAGE

    def __init__(self, cfg: RunConfig, train: torch.Tensor, held: torch.Tensor) -> None:
        self.cfg, self.train, self.held = cfg, train, held

    def batch(self, step: int) -> torch.Tensor:
        pc = self.cfg.pretrain
        return batch_at(self.train, step, self.cfg.seed, pc.batch_size, pc.seq_len).to(self.cfg.device)

    def loss(self, model: GPT, xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], int]:
        return lm_window_loss(model, xb, self.cfg), {}, xb[:, :-1].numel()

    def evaluate(self, model: GPT) -> dict[str, float]:
        return {"eval_loss": evaluate(model, self.held, self.cfg)}

    def summary(self, m: dict[str, float]) -> str:
        return f"pretrain: done, eval loss {m['eval_loss']:.3f}, {m['tokens_per_s']:.0f} tokens/s"


def lm_window_loss(model: GPT, xb: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Next-token cross-entropy of windows ``xb`` [B, T+1]: predict xb[:, 1:] from xb[:, :-1]."""
    with autocast(cfg.dtype, cfg.device.split(":")[0]):
        logits = model(xb[:, :-1]).logits  # [B, T, V]
    return algos.lm_loss(logits.float(), xb[:, 1:])


def import_hf(cfg: RunConfig, reporter: Reporter) -> StageResult:
    """``model.path`` set: the pre-trained model *is* the HF model — it is imported as this stage's final
    checkpoint (architecture "hf" in the manifest, weights as loaded, no training), so SFT starts from a
    checkpoint like any other and the evaluation has its "base" row."""
    from chatrl.services.core.build import open_model

    t0 = time.perf_counter()
    model, tok = open_model(cfg.model.path)
    metrics = {"params": float(model.num_params()), "seconds": time.perf_counter() - t0}
    ck = save_stage(cfg, STAGE, 0, model, tok, None, {"metrics": metrics, "imported_from": str(cfg.model.path)},
                    final=True)
    reporter.log(f"pretrain: imported {cfg.model.path} ({model.cfg.model_type}, {model.num_params() / 1e6:.1f}M "
                 f"params) as {ck.path} in {metrics['seconds']:.1f}s — no pre-training")
    return StageResult(STAGE, ck.path, metrics, metrics["seconds"])


def run(cfg: RunConfig, reporter: Reporter | None = None) -> StageResult:
    reporter = reporter or Reporter()
    pc = cfg.pretrain
    if (done := finished(cfg, STAGE, reporter)) is not None:
        return done
    if cfg.model.path:
        check_run_model(cfg)
        return import_hf(cfg, reporter)
    tok = build_tokenizer(cfg, reporter)
    if cfg.model.vocab_size != tok.vocab_size:
        cfg.model.vocab_size = tok.vocab_size
    if pc.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"pretrain.seq_len ({pc.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    data = torch.from_numpy(corpus_tokens(cfg, tok).astype(np.int64))
    n_eval = max(pc.seq_len * 8, len(data) // 50)
    train_tokens, held = data[:-n_eval], data[-n_eval:]
    torch.manual_seed(derive_seed(cfg.seed, STAGE, "init"))  # the initial weights depend on the seed only
    model = GPT(cfg.model.gpt_config()).to(cfg.device)
    sched = Schedule(pc.steps, pc.lr, pc.warmup_steps, pc.min_lr_ratio, pc.weight_decay, pc.grad_clip,
                     pc.log_every, pc.ckpt_every)
    return train(cfg, PretrainTask(cfg, train_tokens, held), model, tok, sched, reporter,
                 on_start=lambda start: reporter.log(
                     f"pretrain: {model.num_params() / 1e6:.2f}M params, corpus {len(train_tokens):,} tokens, "
                     f"{pc.steps} steps × {pc.batch_size}×{pc.seq_len}"))


def evaluate(model: GPT, held: torch.Tensor, cfg: RunConfig, max_batches: int = 8) -> float:
    """Mean next-token loss over consecutive windows of the held-out tail (the loop sets eval mode)."""
    sl, bs = cfg.pretrain.seq_len, cfg.pretrain.batch_size
    n = min(max_batches * bs, (len(held) - 1) // sl)
    xs = torch.stack([held[i * sl: i * sl + sl + 1] for i in range(n)]).long().to(cfg.device)  # [n, sl+1]
    return float(np.mean([float(lm_window_loss(model, xs[i: i + bs], cfg)) for i in range(0, n, bs)]))
