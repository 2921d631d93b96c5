"""The test kit: every helper more than one test file needs, once.

Import it as ``from kit import ...`` (pytest puts tests/ on sys.path through conftest.py's rootdir
insertion) or ``from tests.kit import ...``. Nothing here patches the code under test; the helpers build
real things (ports, tokenizers, models, checkpoints, servers, processes) and wait on real conditions.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from chatrl.services.runtime.launcher import free_ports  # noqa: F401 (the one implementation, re-exported)

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "micro.yaml"
WAIT = 60.0  # seconds: a generous bound on waits for things that should come within milliseconds
POLL_S = 0.005  # how often wait_for re-checks its condition

# loopback only, small: what every child process that may start Ray or a server gets
CHILD_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
             "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_NODE_IP_ADDRESS": "127.0.0.1"}


# --- ports --------------------------------------------------------------------------------------------

def free_port() -> int:
    """One free loopback port (the launcher's free_ports). A port can still be taken by someone else before
    the caller binds it; servers started in-process should bind port 0 and report the port they got."""
    return free_ports(1)[0]


# --- errors and waiting ----------------------------------------------------------------------------------

def rpc_error(fn: Callable[..., Any], *a, **kw) -> tuple[grpc.StatusCode, str]:
    """Call ``fn``; it must raise a gRPC error. Returns (status code, details) for the test to assert."""
    with pytest.raises(grpc.RpcError) as ei:
        r = fn(*a, **kw)
        if hasattr(r, "__next__"):  # a server stream raises on first read
            list(r)
    return ei.value.code(), ei.value.details()


def wait_for(cond: Callable[[], Any], timeout: float = WAIT, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something true, and return that (a condition wait, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)
    return v


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """``name=value`` in os.environ for the block only (servers read their token from the env at build)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --- tiny models --------------------------------------------------------------------------------------------

TOKENIZER_TEXTS = ["the film was warm and funny", "what did you think of the movie?", "hello there, how are you?",
                   "the story is a delight", "the cast felt honest and moving"]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with the chat special tokens, trained on five sentences (deterministic)."""
    from chatrl.services.core.tokenizer import ChatTokenizer

    return ChatTokenizer.train(TOKENIZER_TEXTS * 10, vocab_size=vocab_size, min_frequency=1)


def tiny_gpt(vocab_size: int, seed: int = 0, max_seq_len: int = 64, scalar_head: bool = False, **cfg):
    """A 2-layer, d_model 32 GPT with weights drawn from ``seed`` (eval mode)."""
    import torch

    from chatrl.services.core.model import GPT, GPTConfig

    torch.manual_seed(seed)
    conf = GPTConfig(**{"vocab_size": vocab_size, "n_layer": 2, "n_head": 2, "d_model": 32,
                        "max_seq_len": max_seq_len, **cfg})
    return GPT(conf, scalar_head=scalar_head).eval()


# a ChatML-style template, as real instruct models have (SmolLM2's minus its default system turn)
HF_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_llama_config(vocab: int, **ids):
    """A 2-layer Llama, hidden size 32 — small enough for every stage in seconds."""
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    initializer_range=0.3, tie_word_embeddings=False, **ids)


def hf_tokenizer(template: str | None = HF_TEMPLATE):
    """A transformers fast tokenizer over the kit's BPE, with chatrl's special tokens and ``template``."""
    import transformers

    from chatrl.services.core.tokenizer import SPECIAL_TOKENS

    ht = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().tok, eos_token="<|endoftext|>",
                                              pad_token="<|pad|>", additional_special_tokens=SPECIAL_TOKENS[2:])
    if template is not None:
        ht.chat_template = template
    return ht


def tiny_hf_dir(path: Path, seed: int = 0, template: str | None = HF_TEMPLATE) -> Path:
    """A random 2-layer Llama + a BPE tokenizer with a chat template, saved as a local HF directory."""
    import torch
    import transformers

    ht = hf_tokenizer(template)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(ht), eos_token_id=ht.eos_token_id, bos_token_id=ht.eos_token_id,
                            pad_token_id=ht.pad_token_id)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    ht.save_pretrained(str(path))
    return path


def save_tiny_checkpoint(root: Path, model, tok, stage: str = "sft", name: str = "final") -> Path:
    """``model`` + ``tok`` as a checkpoint under ``root``; returns ``root`` (what servers take)."""
    from chatrl.services.core.checkpoint import save_checkpoint

    save_checkpoint(root, name, stage=stage, step=1, model_state=model.state_dict(), model_config=model.cfg.to_dict(),
                    tokenizer_json=tok.to_str(), save_rng=False)
    return Path(root)


def tiny_checkpoint(root: Path, seed: int = 0, stage: str = "sft", scalar_head: bool = False,
                    max_seq_len: int = 128) -> Path:
    """A fresh tiny tokenizer + GPT saved as a checkpoint under ``root``."""
    tok = tiny_tokenizer()
    return save_tiny_checkpoint(root, tiny_gpt(tok.vocab_size, seed, max_seq_len, scalar_head), tok, stage)


# --- the micro run config -----------------------------------------------------------------------------------

def micro_data_overrides(tiny_data: dict[str, Path]) -> list[str]:
    """--set overrides pointing configs/micro.yaml's data at conftest's synthetic ``tiny_data``."""
    return [f"data.pretrain_files=[{tiny_data['corpus']}]", f"data.sft_file={tiny_data['sft']}",
            f"data.prompts_file={tiny_data['prompts']}", f"data.eval_prompts_file={tiny_data['eval_prompts']}",
            f"data.rankings_file={tiny_data['rankings']}"]


def micro_config(tiny_data: dict[str, Path], run_dir: Path, *extra: str):
    """configs/micro.yaml on the synthetic data, writing to ``run_dir``, with ``extra`` overrides."""
    from chatrl.services.core.config import load_config

    return load_config(MICRO, [f"run_dir={run_dir}", *micro_data_overrides(tiny_data), *extra])


def micro_yaml(tiny_data: dict[str, Path], gold: Path | None = None, **extra) -> str:
    """configs/micro.yaml as YAML text on the synthetic data, without run_dir (the trainer service gives
    each run its own), as StartRun takes it."""
    import yaml

    d = yaml.safe_load(MICRO.read_text())
    d.pop("run_dir", None)
    d["data"] = {"pretrain_files": [str(tiny_data["corpus"])], "sft_file": str(tiny_data["sft"]),
                 "prompts_file": str(tiny_data["prompts"]), "eval_prompts_file": str(tiny_data["eval_prompts"]),
                 "rankings_file": str(tiny_data["rankings"])}
    if gold is not None:
        d["data"]["gold_file"] = str(gold)
    d.update(extra)
    return yaml.safe_dump(d)


# --- processes ------------------------------------------------------------------------------------------------

class Process:
    """A child process (``python -m module ...`` or any argv) with its output in a log file; always reaped.

    Use as a context manager: on exit a still-running child gets SIGTERM, then SIGKILL after ``WAIT``."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT,
                 new_session: bool = True) -> None:
        self.log_path = Path(log)
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, **CHILD_ENV, **(env or {})}
        self.proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)

    @classmethod
    def module(cls, module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> Process:
        return cls([sys.executable, "-m", module, *args], log=log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT) -> int:
        """The exit status; raises TimeoutError (with the log) if the child is still running."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.proc.args} still running after {timeout}s:\n{self.output()[-4000:]}") from None

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_9_in_ppo_then_resume(cfg, env: dict[str, str], after_kill: Callable[[], None] | None = None,
                               poll_s: float = 0.02) -> str:
    """``chatrl pipeline run`` of ``cfg`` in its own session, SIGKILLed with its whole process group (the
    trainer and its Ray) once round 0's first PPO checkpoint is committed and before the round ends; then
    ``after_kill()``, then ``chatrl pipeline resume``. Returns the resume's stderr (it must succeed)."""
    import yaml

    run = Path(cfg.run_dir)
    cfg_file = run.parent / f"{run.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    err_file = run.parent / f"{run.name}.err"  # a file, not a pipe nobody reads while polling (it could block)
    with open(err_file, "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "chatrl.clients.cli", "pipeline", "run", "-c", str(cfg_file)],
                             stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    # LATEST is the commit point of a checkpoint (written after the rename): a directory alone may not be
    # resumed from yet
    marker, final = run / "checkpoints" / "ppo_r0" / "LATEST", run / "checkpoints" / "ppo_r0" / "final"
    deadline = time.monotonic() + 900  # a loaded machine: the micro run took > 300 s to its first PPO checkpoint
    while not marker.exists():
        assert p.poll() is None, err_file.read_text()[-3000:]
        assert time.monotonic() < deadline, "PPO never reached its first checkpoint: " + err_file.read_text()[-3000:]
        time.sleep(poll_s)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not final.exists(), "the run finished before it could be killed"
    if after_kill is not None:
        after_kill()
    r = subprocess.run([sys.executable, "-m", "chatrl.clients.cli", "pipeline", "resume", str(run)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def random_words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the film movie story cast was is warm funny dull a delight mess long charming honest".split()
    return [" ".join(rng.choice(words) for _ in range(12)) for _ in range(n)]
