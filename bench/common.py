"""Shared by every benchmark: sizes, timing statistics, interleaved measurement, the machine description,
model / tokenizer / checkpoint factories (random weights, nothing from a hub), and a launcher for
services as separate processes on 127.0.0.1.

Conventions: every figure is measured for chatrl and its peer in the same run, *interleaved* (chatrl,
peer, chatrl, peer, …) so that noise from other work on the machine hits both alike; each row reports
min / median / max over the repeats, and the ratio is computed per repeat pair (chatrl ÷ peer for
throughputs, peer ÷ chatrl for latencies: > 1 always means chatrl is faster) and summarised the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_threads() -> int:
    """Torch threads of the training-side benchmarks (5. training, 2. the PPO trainer and TRL): 1 by default.
    On a 2-core machine shared with other work, 2 OpenMP threads that spin at every barrier slow down by up
    to 10× whenever another process takes a core; 1 thread degrades gracefully. ``--threads 2`` (or
    ``CHATRL_BENCH_THREADS=2``) measures the trainer's default ``threads: 2`` on a quiet machine."""
    return max(1, int(os.environ.get("CHATRL_BENCH_THREADS", "1")))

# Ray must stay on loopback; set before anything imports ray.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_NODE_IP_ADDRESS": "127.0.0.1"}
for _k, _v in {**RAY_ENV, "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


# --- sizes --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """How big each benchmark runs. ``micro`` is for the smoke test (seconds), ``quick`` for a first look,
    ``full`` for the published table (≤ 20 minutes on 2 cores)."""

    name: str
    reps: int  # interleaved repeats per row
    # model of benchmarks 1, 2, 4, 6 (the embedded default: configs/tiny.yaml)
    d_model: int = 192
    n_layer: int = 4
    n_head: int = 4
    vocab: int = 3072
    max_seq_len: int = 256
    # 1. generation
    gen_prompt_len: int = 32
    gen_new_tokens: int = 64
    gen_batches: tuple[int, ...] = (1, 8, 32)
    gen_concurrent: int = 32
    # 2. RL iteration
    rl_prompts: int = 16
    rl_samples: int = 4
    rl_new_tokens: int = 32
    rl_minibatch: int = 16
    rl_iterations: int = 3  # measured iterations per repeat (after one warm-up iteration)
    rl_workers: int = 2
    # 3. weight sync: (label, d_model, n_layer, n_head, vocab)
    sync_models: tuple[tuple[str, int, int, int, int], ...] = (
        ("default 2.4M", 192, 4, 4, 3072), ("~100M", 768, 12, 12, 16384))
    # 4. overhead
    overhead_calls: int = 300
    # 5. training
    train_batch: int = 16
    train_seq: int = 128
    train_steps: int = 8
    peak_n: int = 1024
    # 6. scaling
    scale_workers: tuple[int, ...] = (1, 2, 4)
    scale_prompts: int = 32
    scale_samples: int = 2
    scale_new_tokens: int = 32


SIZES = {
    "full": Size("full", reps=5),
    "quick": Size("quick", reps=3, gen_new_tokens=32, gen_batches=(1, 32), gen_concurrent=16, rl_prompts=8,
                  rl_iterations=2, sync_models=(("default 2.4M", 192, 4, 4, 3072), ("~25M", 512, 8, 8, 8192)),
                  overhead_calls=150, train_steps=5, scale_prompts=16, scale_new_tokens=24),
    "micro": Size("micro", reps=2, d_model=32, n_layer=2, n_head=2, vocab=512, max_seq_len=96, gen_prompt_len=8,
                  gen_new_tokens=8, gen_batches=(1, 4), gen_concurrent=4, rl_prompts=4, rl_samples=2,
                  rl_new_tokens=8, rl_minibatch=4, rl_iterations=1, rl_workers=1,
                  sync_models=(("micro", 32, 2, 2, 512),), overhead_calls=20, train_batch=4, train_seq=32,
                  train_steps=2, peak_n=256, scale_workers=(1, 2), scale_prompts=4, scale_samples=2,
                  scale_new_tokens=8),
}


def gpt_config(size: Size, **kw):
    from chatrl.services.core.model import GPTConfig

    d = {"vocab_size": size.vocab, "n_layer": size.n_layer, "n_head": size.n_head, "d_model": size.d_model,
         "max_seq_len": size.max_seq_len}
    d.update(kw)
    return GPTConfig(**d)


def hf_gpt2_config(cfg):
    """A GPT-2 config of the same depth / width / heads / vocab / context as a chatrl GPTConfig."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)


# --- statistics -----------------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    v = [float(x) for x in values]
    if not v:
        return {"n": 0}
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class Row:
    """One comparison: chatrl's figure and its peer's, over interleaved repeats."""

    bench: str
    case: str
    unit: str  # e.g. "tokens/s", "ms", "MB/s"
    chatrl: dict  # stats()
    peer_name: str = ""
    peer: dict = field(default_factory=dict)
    ratio: dict = field(default_factory=dict)  # stats() of per-repeat ratios (> 1 = chatrl faster)
    higher_is_better: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(bench: str, case: str, unit: str, ours: list[float], peer_name: str = "", theirs: list[float] | None = None,
            higher_is_better: bool = True, **extra) -> Row:
    ratios = []
    if theirs:
        for a, b in zip(ours, theirs):
            if a > 0 and b > 0:
                ratios.append(a / b if higher_is_better else b / a)
    return Row(bench, case, unit, stats(ours), peer_name, stats(theirs or []), stats(ratios), higher_is_better, extra)


def interleave(reps: int, fns: dict[str, Callable[[], float]], warmup: int = 1) -> dict[str, list[float]]:
    """Call each fn ``warmup`` times, then ``reps`` rounds of every fn in turn (the order alternates between
    rounds, so neither side always runs right after the other). Each fn returns its figure."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(fns[k]())
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the machine ----------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                fl = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in fl)
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "memory": mem, "os": platform.platform(),
            "python": platform.python_version(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_at_start": load}


def versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("chatrl", "torch", "transformers", "trl", "accelerate", "datasets", "grpcio", "protobuf", "ray",
                "safetensors", "tokenizers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    with contextlib.suppress(Exception):
        out["chatrl_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if dirty:
            out["chatrl_git"] += " (+ uncommitted changes)"
    return out


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 — any import failure means the peer is not usable
        return False
    return True


# --- models, tokenizer, checkpoints ----------------------------------------------------------------------

_WORDS = ("the film movie story cast ending music script was is felt warm funny delight honest moving wonderful "
          "charming dull mess long empty tedious clumsy what did you think of how tell me about like write a short "
          "review great good bad and but with for this that it in on at very really quite plot actor actors scene "
          "scenes character characters director camera light dark love hate time year people").split()


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with the chat template's special tokens, trained on synthetic sentences plus some
    Python standard-library source (plenty of distinct tokens to fill the vocabulary)."""
    import random

    from chatrl.services.core.tokenizer import ChatTokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(3000)]
    libdir = Path(os.__file__).parent
    budget = 1_500_000 if vocab_size > 1024 else 200_000
    for f in sorted(libdir.glob("*.py")):
        if budget <= 0:
            break
        with contextlib.suppress(OSError, UnicodeDecodeError):
            t = f.read_text()[:100_000]
            texts.append(t)
            budget -= len(t)
    return ChatTokenizer.train(texts, vocab_size=vocab_size, min_frequency=2)


def random_gpt(cfg, seed: int = 0, scalar_head: bool = False):
    import torch

    from chatrl.services.core.model import GPT

    torch.manual_seed(seed)
    return GPT(cfg, scalar_head=scalar_head).eval()


def write_checkpoint(root: Path, cfg, tok, *, scalar_head: bool = False, seed: int = 0) -> Path:
    """A chatrl checkpoint with random weights (``reward_bias`` 0 for a scalar-head model)."""
    from chatrl.services.core.checkpoint import save_checkpoint

    m = random_gpt(cfg, seed, scalar_head)
    ck = save_checkpoint(root, "init", stage="reward_model" if scalar_head else "sft", step=0,
                         model_state=m.state_dict(), model_config=cfg.to_dict(), tokenizer_json=tok.to_str(),
                         meta={"reward_bias": 0.0} if scalar_head else {}, save_rng=False)
    return ck.path


def prompts_text(n: int, seed: int = 0, words: tuple[int, int] = (6, 14)) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words))) + "?" for _ in range(n)]


# --- services as processes -------------------------------------------------------------------------------

class ServiceProc:
    """``python -m chatrl.services.<name>`` on 127.0.0.1 with ``threads`` torch threads, its log in
    ``log_dir`` — one service of the launcher's :class:`LocalCluster`, plus its metrics for the benchmarks."""

    def __init__(self, name: str, log_dir: Path, threads: int = 1, metrics: bool = False, **fields) -> None:
        from chatrl.services.runtime.launcher import LocalCluster, free_ports

        self.name = name
        ports = free_ports(2)
        self.port = ports[0]
        self.metrics_port = ports[1] if metrics else -1
        sets = {"host": "127.0.0.1", "port": self.port, "metrics_port": self.metrics_port, "threads": threads,
                **fields}
        self.cluster = LocalCluster(None, [f"{name}.{k}={v}" for k, v in sets.items()], only=[name],
                                    log_dir=log_dir / f"{name}-{self.port}", threads=threads,
                                    env={"CHATRL_AUTH_TOKEN": None})
        self.log_path = self.cluster.log_path(name)
        self.cluster.start(wait_for=[])  # wait() below says how ready

    @property
    def address(self) -> str:
        return self.cluster.address(self.name)

    @property
    def pid(self) -> int:
        return self.cluster.procs[self.name].pid

    def wait(self, serving: bool = True, timeout: float = 120.0) -> None:
        """Until reachable (and SERVING, if asked)."""
        self.cluster.wait(timeout, serving=serving)

    def metric(self, name: str) -> float:
        """Sum of every sample of a Prometheus metric (e.g. ``chatrl_policy_batch_size_sum``)."""
        import urllib.request

        if self.metrics_port < 0:
            raise ValueError(f"{self.name} was started without metrics")
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.cluster.stop()

    def __enter__(self) -> ServiceProc:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Workdir:
    """A temporary directory for one benchmark run (checkpoints, logs); removed at the end unless kept."""

    def __init__(self, keep: bool = False) -> None:
        self._td = tempfile.TemporaryDirectory(prefix="chatrl-bench-")
        self.path = Path(self._td.name)
        self.keep = keep

    def close(self) -> None:
        if not self.keep:
            self._td.cleanup()


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
