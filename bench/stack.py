"""The RLHF stack the RL benchmarks run on: a tokenizer, random-weight SFT and reward-model checkpoints of
the benchmark's model size, policy-inference / reward-scoring / reference-model as separate processes (one
torch thread each) on 127.0.0.1, and Ray started in-process on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.common import ServiceProc, Size, Workdir, build_tokenizer, gpt_config, log, write_checkpoint


@dataclass
class Stack:
    cfg: object  # GPTConfig
    tok: object  # ChatTokenizer
    sft: Path
    rm: Path
    procs: dict[str, ServiceProc]

    @property
    def endpoints(self):
        from chatrl.services.trainer.rollout import Endpoints

        return Endpoints(self.procs["policy"].address, self.procs["reward"].address, self.procs["reference"].address,
                         token="")

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()


_TOKENIZERS: dict[int, object] = {}


def tokenizer(vocab: int):
    if vocab not in _TOKENIZERS:
        _TOKENIZERS[vocab] = build_tokenizer(vocab)
    return _TOKENIZERS[vocab]


def start(size: Size, wd: Workdir, policy_fields: dict | None = None) -> Stack:
    tok = tokenizer(size.vocab)
    cfg = gpt_config(size, vocab_size=max(size.vocab, tok.vocab_size))
    root = wd.path / "ckpt"
    sft = write_checkpoint(root / "sft", cfg, tok, seed=0)
    rm = write_checkpoint(root / "rm", cfg, tok, scalar_head=True, seed=1)
    logs = wd.path / "logs"
    procs = {}
    try:
        procs["policy"] = ServiceProc("policy", logs, checkpoint=sft, **(policy_fields or {}))
        procs["reward"] = ServiceProc("reward", logs, checkpoint=rm)
        procs["reference"] = ServiceProc("reference", logs, checkpoint=sft)
        for p in procs.values():
            p.wait(serving=True)
    except BaseException:
        for p in procs.values():
            p.stop()
        raise
    log(f"stack up: {', '.join(f'{k} {p.address}' for k, p in procs.items())}")
    return Stack(cfg, tok, sft, rm, procs)


def init_ray() -> None:
    from chatrl.services.trainer.rollout import init_ray as start  # loopback-only, or $RAY_ADDRESS

    start(num_cpus=2)
