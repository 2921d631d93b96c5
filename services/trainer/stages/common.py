"""What every training stage shares: seeding, threads, the tokenizer, model loading, the LR schedule,
progress reporting (tqdm locally; the trainer service plugs in its own reporter) and checkpoints."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from chatrl.services.core import build
from chatrl.services.core.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from chatrl.services.core.config import RunConfig
from chatrl.services.core.model import GPT
from chatrl.services.core.seeding import derive_seed
from chatrl.services.core.tokenizer import ChatTokenizer


class Cancelled(Exception):
    """Raised inside a stage when its run was cancelled (checkpoints written so far remain)."""


class Reporter:
    """Receives progress and metrics from a stage. The default draws a tqdm bar and prints metric
    lines; the trainer service subclasses it to stream ``WatchRun`` events and export Prometheus metrics."""

    SHOWN = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward", "gold_train", "kl", "beta", "tokens_per_s")

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.cancel_event = threading.Event()
        self._bar: tqdm | None = None
        self.history: list[dict] = []

    def start(self, stage: str, total: int, initial: int = 0) -> None:
        if not self.quiet:
            self._bar = tqdm(total=total, initial=initial, desc=stage, file=sys.stderr, dynamic_ncols=True,
                             leave=True)

    def progress(self, stage: str, step: int, total: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def metrics(self, stage: str, step: int, total: int, values: dict[str, float]) -> None:
        self.history.append({"stage": stage, "step": step, **values})
        if self._bar is not None:
            keys = [k for k in self.SHOWN if k in values] or list(values)[:4]
            self._bar.set_postfix({k: f"{values[k]:.4g}" for k in keys[:5]})

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        elif not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def finish(self, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    def awaiting_rankings(self, tasks: int) -> None:
        """The run waits for people to rank ``tasks`` comparison tasks (0: it no longer waits). The trainer
        service exports the sum over its runs (``chatrl_trainer_awaiting_rankings``), which
        ``ChatrlLabelingStalled`` needs to tell a blocked run from tasks nobody waits on."""


@dataclass
class StageResult:
    stage: str
    checkpoint: Path
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def setup_runtime(cfg: RunConfig) -> None:
    torch.set_num_threads(max(1, cfg.threads))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    torch.manual_seed(cfg.seed)


def run_dir(cfg: RunConfig) -> Path:
    d = Path(cfg.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return run_dir(cfg) / "checkpoints" / stage


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` then cosine decay to ``peak * min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in n else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def model_from_checkpoint(ckpt: Checkpoint, scalar_head: bool = False, device: str = "cpu") -> torch.nn.Module:
    """The checkpoint's model, GPT or HF (with its LoRA adapters, if trained with them); a scalar head absent
    from the checkpoint is freshly initialised (reward model and value head start from the SFT weights).
    One place builds models: :func:`chatrl.services.core.build.model_from_checkpoint`."""
    return build.model_from_checkpoint(ckpt, scalar_head=scalar_head, device=device)


def tokenizer_from_checkpoint(ckpt: Checkpoint):
    """ChatTokenizer or HFChatTokenizer, as the checkpoint records."""
    return build.tokenizer_from_checkpoint(ckpt)


def run_lengths(cfg: RunConfig) -> dict[str, int]:
    """Every token length the run's stages will ask of the model, by config field (checked against an HF
    model's context before anything loads)."""
    return {"sft.max_len": cfg.sft.max_len,
            "ppo.max_new_tokens (+ the prompt)": cfg.ppo.max_new_tokens + 16,
            "reward.max_new_tokens (+ the prompt)": cfg.reward.max_new_tokens + 16}


def check_run_model(cfg: RunConfig) -> dict | None:
    """Refuse bad model input before any expensive work: with ``model.path``, an HF model directory with a
    chat template, a context that holds the configured lengths and LoRA targets that exist (errors name
    the config field); ``lora.enabled`` without ``model.path`` is refused (LoRA needs an HF model)."""
    if not cfg.model.path:
        if cfg.lora.enabled:
            raise ValueError("lora.enabled: LoRA applies to Hugging Face models; set model.path to a local HF "
                             "model directory (chatrl's own GPT trains every weight)")
        return None
    from chatrl.services.core.hf import check_hf_model

    return check_hf_model(cfg.model.path, run_lengths(cfg), field="model.path", lora=cfg.lora,
                          lora_field="lora.target_modules")


def with_lora(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The model a stage trains: with ``lora.enabled``, LoRA adapters on an HF model (its base weights frozen;
    a model that already carries adapters — a checkpoint trained with them — keeps and trains them)."""
    from chatrl.services.core.lora import apply_lora, is_lora

    if cfg.lora.enabled and not is_lora(model):
        if build.architecture(model.cfg.to_dict()) != "hf":
            raise ValueError("lora.enabled: LoRA applies to Hugging Face models, this checkpoint holds chatrl's GPT")
        # A starts random: drawn from the run's seed (not the process's RNG state), so a resumed or re-run
        # stage builds the same adapters; the global RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "lora-init"))
            apply_lora(model, cfg.lora)
    return model


def stage_done(root: Path) -> Checkpoint | None:
    ck = latest_checkpoint(root)
    if ck is not None and ck.manifest.get("meta", {}).get("final"):
        return ck
    return None


def save_stage(cfg: RunConfig, stage: str, step: int, model: GPT, tok: ChatTokenizer,
               opt: torch.optim.Optimizer | None, meta: dict, final: bool = False) -> Checkpoint:
    name = "final" if final else f"step-{step:07d}"
    return save_checkpoint(stage_dir(cfg, stage), name, stage=stage, step=step, model_state=model.state_dict(),
                           model_config=model.cfg.to_dict(), tokenizer_json=tok.to_str(),
                           optimizer_state=None if final or opt is None else opt.state_dict(),
                           meta={**meta, "final": final, "run_config": cfg.to_dict()})


def previous_stage(cfg: RunConfig, stage: str, init: str | None) -> Checkpoint:
    """The checkpoint a stage starts from: an explicit path, or the final checkpoint of ``stage``."""
    if init:
        return load_checkpoint(Path(init))
    ck = stage_done(stage_dir(cfg, stage))
    if ck is None:
        raise FileNotFoundError(f"stage '{stage}' has no final checkpoint under {stage_dir(cfg, stage)}; "
                                f"run `chatrl train {stage}` first or pass --init")
    return ck


class Throughput:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> None:
        self.tokens += n

    def rate(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)


def write_json(path: Path, obj: dict) -> None:
    from chatrl.services.core.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))
