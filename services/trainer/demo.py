"""``make demo``: the main job on the embedded default, with a table of what each stage achieved."""

from __future__ import annotations

import time

from services.core.config import RunConfig
from services.core.formats import load_prompts
from services.trainer.stages import pretrain, reward_model, sft
from services.trainer.stages.common import (
    Reporter,
    model_from_checkpoint,
    setup_runtime,
    stage_dir,
    stage_done,
    tokenizer_from_checkpoint,
)
from services.trainer.stages.data import resolve_data


def run_demo(cfg: RunConfig) -> int:
    setup_runtime(cfg)
    rep = Reporter()
    t0 = time.perf_counter()
    data = resolve_data(cfg)  # fetches and builds the default data on first use
    times = {"data": time.perf_counter() - t0}
    results = {}
    for name, fn in (("pretrain", pretrain.run), ("sft", sft.run), ("reward", reward_model.run)):
        t = time.perf_counter()
        results[name] = fn(cfg, rep)
        times[name] = time.perf_counter() - t
    rows = []
    if data.gold is not None:
        from services.core.gold import GoldLabeler
        from services.trainer.evaluate import gold_eval

        gold = GoldLabeler.load(data.gold)
        prompts = load_prompts(data.eval_prompts)
        for stage in ("pretrain", "sft"):
            ck = stage_done(stage_dir(cfg, stage))
            ev = gold_eval(model_from_checkpoint(ck, device=cfg.device), tokenizer_from_checkpoint(ck), prompts,
                           gold, cfg)
            rows.append((stage, ev))
    print()
    print("| stage | wall s | key metrics |")
    print("|---|---:|---|")
    for name, res in results.items():
        keys = [k for k in ("eval_loss", "tokens_per_s", "eval_accuracy_before", "eval_accuracy", "reward_bias")
                if k in res.metrics]
        print(f"| {name} | {times[name]:.0f} | " + ", ".join(f"{k} {res.metrics[k]:.3g}" for k in keys) + " |")
    if rows:
        print()
        print("held-out prompts scored by the gold simulated labeler (never shown to the reward model):")
        print("| policy | gold score ± se | finished turns | words |")
        print("|---|---:|---:|---:|")
        for stage, ev in rows:
            print(f"| {stage} | {ev['gold']:+.3f} ± {ev['gold_se']:.3f} | {ev['finished']:.0%} | {ev['length']:.1f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; checkpoints under {cfg.run_dir}/checkpoints")
    return 0
