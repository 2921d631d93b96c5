"""2. RL iteration: one chatrl PPO iteration — Ray rollout workers call policy-inference ``Generate``,
reference-model ``LogProbs`` and reward-scoring ``Score`` over gRPC; the trainer (this process) computes
values, KL-penalised rewards, GAE and the clipped PPO update of policy and value model; the new weights go
back to policy-inference with ``UpdateWeights`` — vs TRL's ``RLOOTrainer`` (TRL 1.x has no PPO trainer) on
the same model size (GPT-2 of equal shape, random weights), the same prompts, batch (P prompts × K samples),
response length, one pass over the batch in minibatches of the same size, KL to a reference model on
(TRL β = 0.05; chatrl adaptive β from 0.1), fp32. Completions/s (and s/iteration).

What each side does per iteration is not identical by design: PPO trains a value model too (a second
forward/backward per minibatch), RLOO has no critic; chatrl recomputes the old logprobs in the trainer
(``ppo.old_logprobs: recompute``), TRL computes them once per generation batch as well.

Threads: services 1 torch thread each; the trainer and TRL ``bench.common.train_threads()`` (1 unless
``--threads``).
"""

from __future__ import annotations

import os
import time

from bench.common import (
    Row,
    Size,
    Workdir,
    compare,
    hf_gpt2_config,
    log,
    prompts_text,
    torch_threads,
    train_threads,
    trl_available,
)

NAME = "rl_iteration"


def chatrl_runner(size: Size, wd: Workdir, stack):
    """chatrl's RL loop (:class:`~chatrl.services.trainer.rl.RLLoop`, what the pipeline and StartRun run) over
    the bench stack's services: Ray rollout workers, pushes to policy-inference. Two learners — one
    synchronous, one with the next rollout overlapped (``ppo.async_rollout``) — take turns on the same
    services, each continuing from the version the other left."""
    from chatrl.clients.lib import PolicyClient
    from chatrl.services.core.checkpoint import load_checkpoint
    from chatrl.services.core.config import load_config
    from chatrl.services.trainer.rl import PolicyServiceSink, RLLoop
    from chatrl.services.trainer.rollout import RayRollout, RolloutPool
    from chatrl.services.trainer.stages.common import Reporter
    from chatrl.services.trainer.stages.ppo import PPOTrainer

    m = stack.cfg

    def config(overlap: bool):
        return load_config(None, [
            f"run_dir={wd.path / 'ppo-run'}", "dtype=fp32", f"threads={train_threads()}",
            f"model={{vocab_size: {m.vocab_size}, n_layer: {m.n_layer}, n_head: {m.n_head}, d_model: {m.d_model}, "
            f"max_seq_len: {m.max_seq_len}}}",
            f"ppo.prompts_per_iteration={size.rl_prompts}", f"ppo.samples_per_prompt={size.rl_samples}",
            f"ppo.max_new_tokens={size.rl_new_tokens}", "ppo.epochs=1", f"ppo.minibatch_size={size.rl_minibatch}",
            f"ppo.num_workers={size.rl_workers}", "ppo.temperature=1.0", "ppo.iterations=1000000",
            f"ppo.async_rollout={str(overlap).lower()}", f"ppo.max_staleness={int(overlap)}"])

    pool = RolloutPool(stack.endpoints, num_workers=size.rl_workers, num_cpus=0.5)
    client = PolicyClient(stack.procs["policy"].address, timeout=600)
    sink = PolicyServiceSink(client)
    prompts = prompts_text(size.rl_prompts * 64, seed=11)
    loops = {}
    for overlap in (False, True):
        cfg = config(overlap)
        trainer = PPOTrainer.from_checkpoints(cfg, load_checkpoint(stack.sft), load_checkpoint(stack.rm), 0)
        loops[overlap] = RLLoop(trainer, RayRollout(stack.endpoints, cfg.ppo, pool=pool), sink, prompts,
                                Reporter(quiet=True))
    state = {"version": client.model_info().model_version, "lens": [], "phases": []}

    def iterations(k: int, overlap: bool) -> float:
        """k iterations of the loop; returns completions/s. ``overlap``: the rollout of iteration i+1 is issued
        before the update of iteration i (samples one policy version old, PPO ratio on the behaviour logprobs)."""
        loop = loops[overlap]
        loop.trainer.version = state["version"]
        t_start = time.perf_counter()
        done = 0
        for it in range(k):
            with torch_threads(train_threads()):
                mt = loop.iteration(issue_next=it + 1 < k)
            if not overlap:
                state["lens"].append(mt["response_len"])
                state["phases"].append((mt["rollout_s"], mt["update_s"], mt["push_s"]))
            done += int(mt["samples"])
        state["version"] = loop.trainer.version
        return done / (time.perf_counter() - t_start)

    def close():
        pool.close()
        client.close()

    return iterations, state, close


def trl_runner(size: Size, wd: Workdir, stack, model_cfg):
    """TRL's RLOO on a random GPT-2 of the stack's shape, with the stack's tokenizer and a random GPT-2 reward
    model (:func:`trl_rloo` does the timing)."""
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = stack.tok
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tok, pad_token="<|pad|>", eos_token="<|end|>",
                                     bos_token="<|endoftext|>")
    hcfg = hf_gpt2_config(model_cfg)
    hcfg.pad_token_id, hcfg.eos_token_id = tok.pad_id, tok.end_id
    torch.manual_seed(0)
    model_dir = wd.path / "hf-policy"
    GPT2LMHeadModel(hcfg).save_pretrained(model_dir)  # TRL builds its reference model from this path
    rcfg = hf_gpt2_config(model_cfg)
    rcfg.num_labels, rcfg.pad_token_id = 1, tok.pad_id
    torch.manual_seed(1)
    reward = GPT2ForSequenceClassification(rcfg)
    prompts = [f"<|user|>{p}<|end|><|assistant|>" for p in prompts_text(size.rl_prompts * 64, seed=11)]
    return trl_rloo(wd, model_dir, reward, hf_tok, prompts, prompts_per_iteration=size.rl_prompts,
                    samples=size.rl_samples, new_tokens=size.rl_new_tokens, minibatch=size.rl_minibatch)


def trl_rloo(wd: Workdir, model_dir, reward, hf_tok, prompts: list, *, prompts_per_iteration: int, samples: int,
             new_tokens: int, minibatch: int, peft_config=None, bf16: bool = False, out: str = "trl-out"):
    """TRL ``RLOOTrainer`` on the HF model in ``model_dir`` (fp32, KL to the reference on, β 0.05), one
    iteration = ``prompts_per_iteration`` × ``samples`` completions of ≤ ``new_tokens``, trained in minibatches
    of ``minibatch``; ``prompts`` are texts or conversations (TRL applies the chat template to those);
    ``peft_config`` trains LoRA adapters (TRL's reference is then the base with the adapters off); ``bf16``
    turns on TRL's mixed precision (autocast over the fp32 weights; the default is plain fp32).
    Returns (iterations(k) → the seconds of k iterations, the mean completion lengths, steps per iteration)."""
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps_per_iter = prompts_per_iteration * samples // minibatch
    args = RLOOConfig(
        output_dir=str(wd.path / out), use_cpu=True, bf16=bf16, fp16=False, seed=0,
        per_device_train_batch_size=minibatch, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_iter, num_generations=samples,
        max_completion_length=new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.05,
        num_iterations=1, learning_rate=1e-5, lr_scheduler_type="constant", max_steps=steps_per_iter,
        logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, model_init_kwargs={"dtype": "float32"})

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    clock = Clock()
    # an explicit fingerprint: datasets would otherwise hash the Arrow table with dill, which fails on some
    # pyarrow/dill pairs (pyarrow's MonthDayNano type) — a cache key the benchmark has no use for
    dataset = Dataset(InMemoryTable.from_pydict({"prompt": prompts}), fingerprint=f"chatrl-bench-{out}")
    trainer = RLOOTrainer(model=str(model_dir), reward_funcs=reward, args=args,
                          train_dataset=dataset, processing_class=hf_tok,
                          reward_processing_classes=hf_tok, callbacks=[clock], peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    lens: list[float] = []

    def iterations(k: int) -> list[float]:
        """Run 1 + k iterations; return the seconds of the last k (the first warms up the fresh train())."""
        clock.begin.clear()
        clock.end.clear()
        trainer.args.max_steps = steps_per_iter * (1 + k)
        with torch_threads(train_threads()):
            trainer.train()
        for h in reversed(trainer.state.log_history):
            if "completions/mean_length" in h:
                lens.append(float(h["completions/mean_length"]))
                break
        out = []
        for i in range(1, 1 + k):
            out.append(clock.end[(i + 1) * steps_per_iter - 1] - clock.begin[i * steps_per_iter])
        return out

    return iterations, lens, steps_per_iter


def run(size: Size, wd: Workdir) -> tuple[list[Row], list[str]]:
    from bench import stack as stk

    stk.init_ray()
    stack = stk.start(size, wd)
    notes: list[str] = []
    n = size.rl_prompts * size.rl_samples
    try:
        iterations, st, close = chatrl_runner(size, wd, stack)
        try:
            log("rl iteration: chatrl warm-up")
            iterations(1, False)
            iterations(2, True)
            st["phases"].clear()
            st["lens"].clear()
            trl = trl_runner(size, wd, stack, stack.cfg) if trl_available() else None
            res: dict[str, list[float]] = {"sync": [], "async": [], "trl": []}

            def run_trl() -> None:
                if trl is not None:
                    secs = trl[0](size.rl_iterations)
                    res["trl"].append(n * len(secs) / sum(secs))

            fns = {"sync": lambda: res["sync"].append(iterations(size.rl_iterations, False)),
                   "async": lambda: res["async"].append(iterations(size.rl_iterations, True)),
                   "trl": run_trl}
            for rep in range(size.reps):
                log(f"rl iteration: repeat {rep + 1}/{size.reps}")
                for k in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
                    fns[k]()
        finally:
            close()
        phases = st["phases"]
        roll, upd, push = (sum(p[i] for p in phases) / len(phases) for i in range(3))
        extra = {"prompts": size.rl_prompts, "samples_per_prompt": size.rl_samples, "max_new_tokens": size.rl_new_tokens,
                 "minibatch": size.rl_minibatch, "chatrl_mean_response_len": sum(st["lens"]) / max(1, len(st["lens"])),
                 "chatrl_rollout_s": roll, "chatrl_update_s": upd, "chatrl_push_s": push,
                 "rollout_workers": size.rl_workers, "train_threads": train_threads()}
        case = f"{size.rl_prompts} prompts × {size.rl_samples} samples, ≤{size.rl_new_tokens} tokens"
        if trl is not None:
            import trl as trl_mod

            peer = f"TRL {trl_mod.__version__} RLOOTrainer"
            extra["trl_mean_response_len"] = sum(trl[1]) / max(1, len(trl[1]))
            rows = [compare(NAME, f"PPO iteration, {case}", "completions/s", res["sync"], peer, res["trl"], **extra),
                    compare(NAME, f"PPO iteration with the next rollout overlapped, {case}", "completions/s",
                            res["async"], peer, res["trl"])]
        else:
            rows = [compare(NAME, f"PPO iteration, {case}", "completions/s", res["sync"], **extra),
                    compare(NAME, f"PPO iteration with the next rollout overlapped, {case}", "completions/s",
                            res["async"])]
            notes.append("TRL is not installed (pip install -e '.[bench]'): peer skipped")
        notes.append("overlapped = the rollout of iteration i+1 is issued before the update of iteration i "
                     "(samples one policy version old, PPO ratio on the behaviour logprobs: ppo.old_logprobs=service, "
                     "what ppo.async_rollout does); each repeat starts with one rollout that nothing overlaps")
        notes.append(f"one chatrl iteration = rollout {roll:.2f} s + PPO update {upd:.2f} s + UpdateWeights {push:.2f} s "
                     f"(means)")
        return rows, notes
    finally:
        stack.close()


if __name__ == "__main__":
    from bench.report import standalone

    standalone(run)
