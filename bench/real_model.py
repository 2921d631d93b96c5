"""7. Real model (issue 10's three rows), on SmolLM2-135M-Instruct as ``chatrl model fetch smollm2-135m-instruct``
converts it (any local HF causal LM with a chat template: ``--real-model DIR`` or ``$CHATRL_BENCH_REAL_MODEL``).
Opt-in, ``python -m bench.run --real``: the rows take ~15 minutes on 2 idle cores.

1. **Generate** over gRPC (policy-inference, a separate process, 1 torch thread) vs HF ``generate()``
   in-process (1 thread) on the same weights, batch 1 and 16, sampled (T = 1), the same chat-rendered
   prompts and exactly ``max_new_tokens`` new tokens on both sides (no end token: the policy is pushed
   without a tokenizer, HF's ``eos_token_id`` is unset). Goal ≥ 2×. Twice: fp32 weights on both sides;
   then the service holding bf16 weights (``policy.dtype=bf16``) vs HF with bf16 weights and vs HF fp32.
2. **One RL iteration** (rollout + score + reference + update + push) of chatrl — the RL loop with Ray
   workers calling the three model services, ``ppo.algorithm: rloo`` (TRL's algorithm), LoRA adapters
   trained and pushed — vs TRL ``RLOOTrainer`` with the same model, prompts (P × K completions, ≤ N tokens,
   TRL applies the same chat template), one minibatch, KL on, fp32 and the same LoRA setting
   (``peft.LoraConfig`` from chatrl's own ``lora`` config). Completions/s. Goal ≥ 1.5×. Twice: fp32 on both
   sides; then demo-real's setting (the trainer under bf16 autocast, the three services holding bf16 weights)
   vs TRL with ``bf16=True`` (its mixed precision: bf16 autocast over fp32 weights, generation included).
3. **Bytes per push**: a real ``UpdateWeights`` to the RL run's policy-inference replica of the LoRA
   adapters (``weights: adapter`` + ``lora_base``, what a LoRA run pushes each iteration) vs the full state
   dict of the same model; MB and seconds per push. Goal ≤ 5 % of the bytes.

Where a row falls short, the notes give the phase times that say why (the RL loop's rollout / update /
push seconds, the engine's mean batch).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    ROOT,
    Row,
    ServiceProc,
    Size,
    Workdir,
    compare,
    interleave,
    log,
    prompts_text,
    torch_threads,
    train_threads,
    trl_available,
)

NAME = "real_model"
MODEL_ENV = "CHATRL_BENCH_REAL_MODEL"
DEFAULT_MODEL = ROOT / ".cache" / "chatrl" / "models" / "smollm2-135m-instruct"
PEER_GEN = "HF transformers generate()"


@dataclass(frozen=True)
class RealSize:
    """How big the real-model rows run, per bench size (``micro`` is the smoke test's tiny random Llama)."""

    reps: int = 3  # interleaved repeats per row
    gen_batches: tuple[int, ...] = (1, 16)
    gen_new_tokens: int = 64
    rl_prompts: int = 4  # P prompts × K samples = one minibatch, as configs/smollm2.yaml's ppo.minibatch_size
    rl_samples: int = 4
    rl_new_tokens: int = 48
    rl_iterations: int = 2  # measured iterations per repeat (after a warm-up)
    rl_workers: int = 2
    rl_dtypes: tuple[str, ...] = ("fp32", "bf16")  # one RL pass per dtype (services restarted in it)
    lora_r: int = 8  # configs/smollm2.yaml's lora section
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("all-linear",)


REAL_SIZES = {
    "full": RealSize(),
    "quick": RealSize(reps=2, gen_new_tokens=32, rl_new_tokens=32, rl_iterations=1),
    "micro": RealSize(reps=1, gen_batches=(1, 4), gen_new_tokens=8, rl_prompts=2, rl_samples=2, rl_new_tokens=8,
                      rl_iterations=1, rl_workers=1, lora_r=4, lora_alpha=8.0),
}


def model_dir(explicit: str | Path | None = None) -> Path:
    """The model the rows run on: ``explicit``, else ``$CHATRL_BENCH_REAL_MODEL``, else the fetched SmolLM2."""
    return Path(explicit or os.environ.get(MODEL_ENV) or DEFAULT_MODEL)


def run(size: Size, wd: Workdir, path: str | Path | None = None) -> tuple[list[Row], list[str]]:
    from bench.run import Skipped
    from chatrl.services.core.hf import is_hf_dir

    src = model_dir(path)
    if not is_hf_dir(src):
        raise Skipped(f"no HF model at {src}: run `chatrl model fetch smollm2-135m-instruct` first (or point "
                      f"--real-model / ${MODEL_ENV} at a local HF model directory)")
    rs = REAL_SIZES.get(size.name, REAL_SIZES["quick"])
    notes = [f"model {src}"]
    from chatrl.services.core.model import native_bf16

    if not native_bf16():
        notes.append("this CPU has no native bf16 matmuls (no AVX-512 BF16 / AMX): the bf16 rows run torch's "
                     "generic bf16 GEMM, many times slower than fp32 — read them as this machine's, not bf16's")
    rows = generation_rows(rs, wd, src, notes)
    for i, dtype in enumerate(rs.rl_dtypes):
        rows += rl_and_push_rows(rs, wd, src, notes, dtype=dtype, pushes=i == 0)
    return rows, notes


# --- 1. Generate vs HF generate() --------------------------------------------------------------------------

def chat_prompt_ids(tok, n: int, seed: int) -> list[list[int]]:
    """``n`` one-turn chat prompts rendered with the model's own template (generation prompt appended)."""
    return [list(tok.prompt_ids(p)) for p in prompts_text(n, seed=seed)]


def generation_rows(rs: RealSize, wd: Workdir, src: Path, notes: list[str]) -> list[Row]:
    """Per dtype: the policy service holding fp32 weights vs HF in fp32; then the service holding bf16 weights
    (``policy.dtype=bf16``, what demo-real serves) vs HF with bf16 weights and vs HF fp32 (HF's default, the
    issue's baseline) in the same interleaved repeats."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatrl.services.core.build import open_model

    model, tok = open_model(src)  # chatrl's view of the same weights: what the policy service is pushed
    state, config_json = model.state_dict(), json.dumps(model.cfg.to_dict())
    del model
    hfs = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=dt).eval()
        hf.generation_config.eos_token_id = None  # exactly max_new_tokens, as the tokenizer-less policy
        hf.generation_config.pad_token_id = tok.pad_id
        hfs[name] = hf
    rows: list[Row] = []
    for dtype in ("fp32", "bf16"):
        with ServiceProc("policy", wd.path / "logs", threads=1, metrics=True, max_batch_size=max(rs.gen_batches),
                         dtype=dtype) as svc:
            rows += _generation_pass(rs, svc, tok, state, config_json, hfs, dtype)
    notes.append("Generate: goal ≥ 2× HF generate() (issue 10); 1 torch thread on both sides, no end token; the "
                 "fp32 rows hold fp32 weights on both sides; the bf16 rows serve bf16 weights (policy.dtype=bf16, "
                 "demo-real's setting) against HF holding bf16 weights too, and against HF's fp32 default")
    return rows


def _generation_pass(rs: RealSize, svc: ServiceProc, tok, state: dict, config_json: str, hfs: dict,
                     dtype: str) -> list[Row]:
    from chatrl.clients.lib import PolicyClient

    n_new = rs.gen_new_tokens
    rows: list[Row] = []
    svc.wait(serving=False)
    client = PolicyClient(svc.address, timeout=600)
    # no tokenizer_json: the engine knows no end token, so every row decodes n_new tokens like HF's
    client.update_weights(state, 1, metadata={"config_json": config_json})
    svc.wait(serving=True)
    for b in rs.gen_batches:
        prompts = chat_prompt_ids(tok, b, seed=5 + b)

        def ours(prompts=prompts) -> float:
            t = time.perf_counter()
            res = client.generate(prompts, max_new_tokens=n_new, temperature=1.0, seed=7)
            dt = time.perf_counter() - t
            toks = sum(len(c.token_ids) for r in res.results for c in r.completions)
            assert toks == len(prompts) * n_new, f"expected {len(prompts) * n_new} tokens, got {toks}"
            return toks / dt

        def theirs(hf, prompts=prompts) -> float:
            with torch_threads(1):
                t = time.perf_counter()
                toks = hf_generate(hf, prompts, n_new, tok.pad_id, seed=7)
                return toks / (time.perf_counter() - t)

        peers = {"fp32": lambda: theirs(hfs["fp32"])}
        if dtype == "bf16":
            peers = {"bf16": lambda: theirs(hfs["bf16"]), **peers}
        label = "" if dtype == "fp32" else ", bf16 weights"
        log(f"real model: Generate, sampled, batch {b}{label}")
        before = svc.metric("chatrl_policy_batch_size_sum"), svc.metric("chatrl_policy_batch_size_count")
        r = interleave(rs.reps, {"chatrl": ours, **peers})
        steps = svc.metric("chatrl_policy_batch_size_count") - before[1]
        mean_batch = (svc.metric("chatrl_policy_batch_size_sum") - before[0]) / steps if steps else None
        for peer_dtype in peers:
            peer = PEER_GEN + ("" if peer_dtype == dtype else f", {peer_dtype} weights")
            rows.append(compare(NAME, f"Generate, sampled, batch {b}{label}", "tokens/s", r["chatrl"], peer,
                                r[peer_dtype], new_tokens=n_new, mean_prompt_len=sum(map(len, prompts)) / b,
                                mean_engine_batch=mean_batch, threads=1))
    client.close()
    return rows


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, pad_id: int, seed: int) -> int:
    """HF ``generate()`` on a left-padded batch (what a transformers user does); returns the tokens generated."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0)
    n = (out.shape[1] - width) * out.shape[0]
    assert n == new_tokens * len(prompts), f"HF generated {n} tokens, expected {new_tokens * len(prompts)}"
    return n


# --- 2. RL iteration vs TRL, and 3. bytes per push ----------------------------------------------------------

def run_config(rs: RealSize, wd: Workdir, src: Path, dtype: str = "fp32"):
    from chatrl.services.core.config import load_config

    targets = ", ".join(rs.lora_targets)
    return load_config(None, [
        f"run_dir={wd.path / f'real-run-{dtype}'}", f"dtype={dtype}", f"threads={train_threads()}", f"model.path={src}",
        "lora.enabled=true", f"lora.r={rs.lora_r}", f"lora.alpha={rs.lora_alpha}", f"lora.target_modules=[{targets}]",
        "ppo.algorithm=rloo", f"ppo.prompts_per_iteration={rs.rl_prompts}", f"ppo.samples_per_prompt={rs.rl_samples}",
        f"ppo.max_new_tokens={rs.rl_new_tokens}", "ppo.epochs=1", f"ppo.minibatch_size={rs.rl_prompts * rs.rl_samples}",
        f"ppo.num_workers={rs.rl_workers}", "ppo.temperature=1.0", "ppo.iterations=1000000", "ppo.init_kl_coef=0.05",
        "ppo.adaptive_kl=false"])


def checkpoints(cfg, src: Path, root: Path) -> tuple[Path, Path]:
    """The RL round's starting points as a LoRA run has them: the policy (base + fresh adapters, B = 0, as
    after ``import`` + a LoRA SFT) and a reward model (base + adapters + a fresh scalar head)."""
    from chatrl.services.core.build import open_model
    from chatrl.services.core.checkpoint import save_checkpoint
    from chatrl.services.trainer.stages.common import with_lora

    out = []
    for name, head in (("sft", False), ("rm", True)):
        model, tok = open_model(src, scalar_head=head)
        with_lora(cfg, model)
        ck = save_checkpoint(root / name, "init", stage="reward_model" if head else "sft", step=0,
                             model_state=model.state_dict(), model_config=model.cfg.to_dict(),
                             tokenizer_json=tok.to_str(), meta={"reward_bias": 0.0} if head else {}, save_rng=False)
        out.append(ck.path)
        del model
    return out[0], out[1]


def rl_and_push_rows(rs: RealSize, wd: Workdir, src: Path, notes: list[str], dtype: str = "fp32",
                     pushes: bool = True) -> list[Row]:
    """The RL-iteration row with the trainer computing in ``dtype`` and the three services holding ``dtype``
    weights (a fresh policy / reward / reference and Ray pool per call), then, if ``pushes``, the push rows."""
    from bench import stack as stk
    from chatrl.clients.lib import PolicyClient
    from chatrl.services.core.checkpoint import load_checkpoint
    from chatrl.services.trainer.pipeline import policy_metadata
    from chatrl.services.trainer.rl import PolicyServiceSink, RLLoop
    from chatrl.services.trainer.rollout import Endpoints, RayRollout, RolloutPool
    from chatrl.services.trainer.stages.common import Reporter
    from chatrl.services.trainer.stages.ppo import PPOTrainer

    cfg = run_config(rs, wd, src, dtype)
    log(f"real model ({dtype}): writing the policy and reward checkpoints")
    sft, rm = checkpoints(cfg, src, wd.path / f"real-ckpt-{dtype}")
    stk.init_ray()
    logs = wd.path / "logs"
    procs: dict[str, ServiceProc] = {}
    try:
        procs["policy"] = ServiceProc("policy", logs, dtype=dtype)  # empty: seeded by a push, as the pipeline does
        procs["reward"] = ServiceProc("reward", logs, checkpoint=rm, dtype=dtype)
        procs["reference"] = ServiceProc("reference", logs, checkpoint=sft, dtype=dtype)
        procs["policy"].wait(serving=False)
        client = PolicyClient(procs["policy"].address, timeout=600)
        meta = policy_metadata(sft)  # config + tokenizer + lora_base: later pushes carry only the adapters
        client.update_weights(load_checkpoint(sft).model_state(), 1, metadata=meta)
        for p in procs.values():
            p.wait(serving=True)
        endpoints = Endpoints(procs["policy"].address, procs["reward"].address, procs["reference"].address, token="")
        trainer = PPOTrainer.from_checkpoints(cfg, load_checkpoint(sft), None, 0)
        trainer.version = 1
        pool = RolloutPool(endpoints, num_workers=rs.rl_workers, num_cpus=0.5)
        sink = PolicyServiceSink(client, meta)
        loop = RLLoop(trainer, RayRollout(endpoints, cfg.ppo, pool=pool), sink, prompts_text(rs.rl_prompts * 64, 11),
                      Reporter(quiet=True))
        phases: list[dict] = []

        def chatrl_iterations(k: int) -> float:
            t = time.perf_counter()
            done = 0
            for _ in range(k):
                with torch_threads(train_threads()):
                    mt = loop.iteration(issue_next=False)
                phases.append(mt)
                done += int(mt["samples"])
            return done / (time.perf_counter() - t)

        try:
            rows = rl_rows(rs, wd, src, cfg, chatrl_iterations, phases, notes, dtype)
            if pushes:
                rows += push_rows(rs, trainer, sink, client, meta, phases, notes)
        finally:
            pool.close()
            client.close()
    finally:
        for p in procs.values():
            p.stop()
    return rows


def rl_rows(rs: RealSize, wd: Workdir, src: Path, cfg, chatrl_iterations, phases: list[dict],
            notes: list[str], dtype: str = "fp32") -> list[Row]:
    n = rs.rl_prompts * rs.rl_samples
    log(f"real model ({dtype}): RL iteration, chatrl warm-up")
    chatrl_iterations(1)
    phases.clear()
    trl = trl_peer(rs, wd, src, cfg, bf16=dtype == "bf16") if trl_available() else None
    res: dict[str, list[float]] = {"chatrl": [], "trl": []}

    def run_trl() -> None:
        if trl is not None:
            secs = trl[0](rs.rl_iterations)
            res["trl"].append(n * len(secs) / sum(secs))

    fns = {"chatrl": lambda: res["chatrl"].append(chatrl_iterations(rs.rl_iterations)), "trl": run_trl}
    for rep in range(rs.reps):
        log(f"real model ({dtype}): RL iteration, repeat {rep + 1}/{rs.reps}")
        for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            fns[k]()
    mean = {k: sum(p[k] for p in phases) / len(phases) for k in ("rollout_s", "update_s", "push_s", "response_len")}
    extra = {"dtype": dtype, "prompts": rs.rl_prompts, "samples_per_prompt": rs.rl_samples, "max_new_tokens": rs.rl_new_tokens,
             "lora_r": rs.lora_r, "lora_targets": ",".join(rs.lora_targets), "rollout_workers": rs.rl_workers,
             "train_threads": train_threads(), "chatrl_mean_response_len": mean["response_len"],
             "chatrl_rollout_s": mean["rollout_s"], "chatrl_update_s": mean["update_s"], "chatrl_push_s": mean["push_s"]}
    case = f"RLOO iteration with LoRA, {rs.rl_prompts} prompts × {rs.rl_samples} samples, ≤{rs.rl_new_tokens} tokens"
    if dtype != "fp32":
        case += f", {dtype} (trainer autocast, services hold {dtype} weights)"
    if trl is None:
        notes.append("TRL is not installed (pip install -e '.[bench]'): the RL-iteration peer is skipped")
        row = compare(NAME, case, "completions/s", res["chatrl"], **extra)
    else:
        import trl as trl_mod

        extra["trl_mean_response_len"] = sum(trl[1]) / max(1, len(trl[1]))
        peer = f"TRL {trl_mod.__version__} RLOOTrainer (peft LoRA{', bf16=True' if dtype == 'bf16' else ''})"
        row = compare(NAME, case, "completions/s", res["chatrl"], peer, res["trl"], **extra)
    notes.append(f"RL iteration ({dtype}): goal ≥ 1.5× TRL (issue 10); one chatrl iteration = rollout {mean['rollout_s']:.2f} s "
                 f"(Generate + reference LogProbs + Score via Ray workers) + update {mean['update_s']:.2f} s "
                 f"(old logprobs, KL, RLOO advantages, one LoRA step) + push {mean['push_s']:.2f} s (means); responses "
                 f"end at the end token on both sides, so compare the mean response lengths too")
    return [row]


def trl_peer(rs: RealSize, wd: Workdir, src: Path, cfg, bf16: bool = False):
    """TRL RLOO on ``src`` with the run's LoRA setting and a reward model of the same backbone (random head);
    ``bf16``: TRL's mixed precision (``bf16=True``)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    from bench.rl_iteration import trl_rloo

    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(
        str(src), local_files_only=True, num_labels=1, dtype=torch.float32, pad_token_id=tok.pad_token_id)
    prompts = [[{"role": "user", "content": p}] for p in prompts_text(rs.rl_prompts * 64, 11)]
    mb = rs.rl_prompts * rs.rl_samples
    with torch.device("meta"):  # the architecture names the LoRA targets; no weights needed for that
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src), local_files_only=True))
    peft_config = cfg.lora.to_peft(shape, shape.config.num_hidden_layers)
    return trl_rloo(wd, src, reward, tok, prompts, prompts_per_iteration=rs.rl_prompts, samples=rs.rl_samples,
                    new_tokens=rs.rl_new_tokens, minibatch=mb, peft_config=peft_config, bf16=bf16,
                    out=f"trl-real{'-bf16' if bf16 else ''}")


def push_rows(rs: RealSize, trainer, sink, client, meta: dict, phases: list[dict], notes: list[str]) -> list[Row]:
    """Adapter pushes (the sink, as the RL loop pushes) and full-state pushes of the same policy, alternating on
    the RL run's replica; each a real UpdateWeights (serialise, sha256, 1 MiB chunks, the server applies it)."""
    from chatrl.services.core.lora import adapter_state_dict, state_bytes

    adapter, full = adapter_state_dict(trainer.policy), trainer.policy.state_dict()
    a_mb, f_mb = state_bytes(adapter) / 1e6, state_bytes(full) / 1e6

    def push(state, use_sink: bool):
        def fn() -> float:
            trainer.version += 1
            t = time.perf_counter()
            if use_sink:
                sink.push(state, trainer.version)
            else:
                client.update_weights(state, trainer.version, metadata=meta)
            return time.perf_counter() - t
        return fn

    log(f"real model: UpdateWeights, adapter {a_mb:.1f} MB vs full state {f_mb:.1f} MB")
    with torch_threads(1):
        r = interleave(max(2, rs.reps), {"adapter": push(adapter, True), "full": push(full, False)})
    loop_bytes = [p["push_bytes"] / 1e6 for p in phases]
    per_iter = sum(loop_bytes) / len(loop_bytes) if loop_bytes else None
    rows = [compare(NAME, "bytes per UpdateWeights, LoRA adapter vs full state dict", "MB", [a_mb], "full state dict",
                    [f_mb], higher_is_better=False, fraction_of_full=a_mb / f_mb,
                    rl_loop_MB_pushed_per_iteration=per_iter),
            compare(NAME, "seconds per UpdateWeights, LoRA adapter vs full state dict", "s", r["adapter"],
                    "full state dict", r["full"], higher_is_better=False)]
    notes.append(f"bytes per push: the adapter is {100 * a_mb / f_mb:.2f} % of the full state dict (goal ≤ 5 %, "
                 f"issue 10); the ratio column is full ÷ adapter")
    return rows


if __name__ == "__main__":  # python -m bench.real_model [micro|quick|full]
    from bench.report import standalone

    standalone(run)
