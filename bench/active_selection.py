"""Active selection vs random prompts for the reward model's labels (issue 13), with the simulated labelers.

``python -m bench.active_selection [--seeds 3] [--rounds 5] [--batch 16]`` trains once a small policy
(pretrain → SFT on the embedded data, d_model 48), then per seed and strategy collects labels in rounds through the one
label path (:func:`labels.collect_rankings` over an in-process feedback store, the simulated labelers at
``reward.label_noise``): round 0 picks ``batch`` prompts at random; every later round picks ``batch`` more,
at random (``random``) or by the current reward model's uncertainty (``margin``: the closest-scored
responses; ``ensemble``: 3 reward models on bootstrap resamples of the labels, where they disagree most),
and a fresh reward model (from the SFT weights) is trained on all labels so far. Its accuracy is measured
on a fixed held-out set: K responses to each eval prompt ordered by the gold function without noise.
Writes ``bench/results/active-selection.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT
from chatrl.services.core.checkpoint import load_checkpoint
from chatrl.services.core.config import load_config
from chatrl.services.core.feedback_store import FeedbackStore
from chatrl.services.core.formats import Ranking, load_prompts
from chatrl.services.core.gold import GoldLabeler
from chatrl.services.core.seeding import derive_seed
from chatrl.services.trainer import active, labels
from chatrl.services.trainer.stages import pretrain, reward_model, sft
from chatrl.services.trainer.stages.common import Reporter, model_from_checkpoint, tokenizer_from_checkpoint
from chatrl.services.trainer.stages.data import resolve_data

RESULTS = ROOT / "bench" / "results"
STRATEGIES = ("random", "margin", "ensemble")
BASE = ["name=active", "seed=11", "dtype=fp32", "threads=1",
        "model.n_layer=2", "model.n_head=2", "model.d_model=48", "model.max_seq_len=96", "tokenizer.vocab_size=1024",
        "pretrain.steps=250", "pretrain.batch_size=16", "pretrain.seq_len=64", "pretrain.ckpt_every=1000",
        "sft.steps=120", "sft.batch_size=16", "sft.max_len=80", "sft.ckpt_every=1000",
        "reward.k=4", "reward.max_new_tokens=16", "reward.epochs=4", "reward.batch_size=8", "reward.lr=0.001",
        "reward.eval_fraction=0.05", "reward.label_noise=0.5", "reward.log_every=1000", "pipeline.labelers=2"]


def held_out(policy, tok, cfg, gold: GoldLabeler, prompts: list[str]) -> list[Ranking]:
    """K responses per eval prompt, ordered by the gold function without noise (ties dropped: no order)."""
    out = []
    for p, (texts, fins) in zip(prompts, labels.sample_responses(policy, tok, prompts, cfg.reward.k, 1.0,
                                                                 cfg.reward.max_new_tokens, 99, cfg)):
        s = gold.score_batch([p] * len(texts), texts, fins)
        order = [int(i) for i in np.argsort(-s, kind="stable")]
        ties = [bool(s[order[i]] == s[order[i + 1]]) for i in range(len(order) - 1)]
        out.append(Ranking(p, texts, order, fins, ties if any(ties) else []))
    return out


def accuracy(ckpt_path: Path, tok, cfg, test: list[Ranking]) -> float:
    model = model_from_checkpoint(load_checkpoint(ckpt_path), scalar_head=True).eval()
    import torch

    with torch.no_grad():
        return reward_model.evaluate(model, reward_model.encode_rankings(tok, test, model.cfg.max_seq_len), tok,
                                     cfg)[1]


def run_strategy(strategy: str, seed: int, cfg, sft_path: Path, policy, tok, gold, prompts: list[str],
                 test: list[Ranking], rounds: int, batch: int, work: Path) -> list[dict]:
    rep = Reporter(quiet=True)
    cfg = dataclasses.replace(cfg, seed=seed, run_dir=str(work / f"{strategy}-s{seed}"),
                              reward=dataclasses.replace(cfg.reward, num_prompts=batch))
    pool, labeled, rows = list(prompts), [], []
    models: list[tuple] = []  # the reward models of the last round: (GPT, bias)
    with FeedbackStore(Path(cfg.run_dir) / "feedback.db") as store:
        local = labels.LocalLabels(store, policy, tok, cfg)
        for t in range(rounds):
            select = None
            if t > 0 and strategy != "random":
                select = active.ActiveSelector(strategy, active.in_process_scores(
                    policy, models, tok, cfg, derive_seed(seed, "active", t)))
            name = f"t{t}"
            got = labels.collect_rankings(cfg, local, pool, gold, name, Path(cfg.run_dir) / "data" / f"{name}.jsonl",
                                          rep, select=select)
            taken = {r.prompt for r in got}
            pool = [p for p in pool if p not in taken]
            labeled += got
            members = 3 if strategy == "ensemble" else 1
            models, accs = [], []
            for m in range(members):
                rk = labeled if m == 0 else [labeled[i] for i in np.random.default_rng(
                    derive_seed(seed, t, m)).integers(0, len(labeled), len(labeled))]  # bootstrap resample
                res = reward_model.run(cfg, rep, init=str(sft_path), rankings=rk, stage=f"reward_t{t}_m{m}")
                ck = load_checkpoint(res.checkpoint)
                models.append((model_from_checkpoint(ck, scalar_head=True).eval(),
                               float(ck.manifest["meta"].get("reward_bias", 0.0))))
                if m == 0:
                    accs.append(accuracy(res.checkpoint, tok, cfg, test))
            rows.append({"strategy": strategy, "seed": seed, "round": t, "labels": len(labeled), "accuracy": accs[0]})
            print(f"  {strategy:8s} seed {seed} round {t}: {len(labeled):3d} rankings → held-out accuracy "
                  f"{accs[0]:.3f}", flush=True)
    return rows


def summarize(rows: list[dict], strategies) -> tuple[str, dict]:
    counts = sorted({r["labels"] for r in rows})
    table = {s: {n: [r["accuracy"] for r in rows if r["strategy"] == s and r["labels"] == n] for n in counts}
             for s in strategies}
    head = "| rankings | " + " | ".join(strategies) + " |"
    lines = [head, "|" + "---|" * (len(strategies) + 1)]
    for n in counts:
        cells = []
        for s in strategies:
            a = np.asarray(table[s][n])
            cells.append(f"{a.mean():.3f} ± {a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0:.3f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines), table


def paired(rows: list[dict], strategies) -> str:
    """Each strategy minus random at the same seed and label count (after round 0, which is random for all),
    averaged per seed: mean ± standard error over seeds, and how many (seed, count) points it won."""
    acc = {(r["strategy"], r["seed"], r["labels"]): r["accuracy"] for r in rows}
    seeds, first = sorted({r["seed"] for r in rows}), min(r["labels"] for r in rows)
    counts = sorted({r["labels"] for r in rows} - {first})
    out = []
    for s in strategies:
        if s == "random" or "random" not in strategies or not counts:
            continue
        d = np.array([[acc[(s, sd, n)] - acc[("random", sd, n)] for n in counts] for sd in seeds])
        per_seed = d.mean(axis=1)
        se = per_seed.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0.0
        out.append(f"- {s} − random: {per_seed.mean():+.3f} ± {se:.3f} accuracy (per-seed means "
                   f"{', '.join(f'{x:+.3f}' for x in per_seed)}); ahead at {int((d > 0).sum())} of {d.size} points")
    return "\n".join(out)


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, per in table.items():
        ns = sorted(per)
        m = np.array([np.mean(per[n]) for n in ns])
        se = np.array([np.std(per[n], ddof=1) / np.sqrt(len(per[n])) if len(per[n]) > 1 else 0 for n in ns])
        ax.errorbar(ns, m, yerr=se, marker="o", capsize=3, label=s)
    ax.set_xlabel("rankings labeled (K = 4, 6 pairs each)")
    ax.set_ylabel("reward model held-out pairwise accuracy")
    ax.set_title(title.replace(", label", ",\nlabel"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="rankings labeled per round")
    ap.add_argument("--test-prompts", type=int, default=120)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-active"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    a = ap.parse_args(argv)
    if a.report_only:
        saved = json.loads((RESULTS / "active-selection.json").read_text())
        return report(saved["rows"], argparse.Namespace(**saved["args"]), saved.get("label_noise", 0.5),
                      saved.get("held_out", a.test_prompts), saved.get("seconds", 0.0))
    import torch

    torch.set_num_threads(1)
    work = Path(a.work)
    cfg = load_config(ROOT / "configs" / "micro.yaml", [*BASE, f"run_dir={work / 'base'}"])
    rep = Reporter(quiet=True)
    t0 = time.perf_counter()
    pretrain.run(cfg, rep)
    sft_path = sft.run(cfg, rep).checkpoint
    print(f"policy: pretrain + SFT ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    data = resolve_data(cfg)
    gold = GoldLabeler.load(data.gold)
    ck = load_checkpoint(sft_path)
    tok, policy = tokenizer_from_checkpoint(ck), model_from_checkpoint(ck).eval()
    prompts = load_prompts(data.prompts)[:1500]
    test = held_out(policy, tok, cfg, gold, load_prompts(data.eval_prompts)[: a.test_prompts])
    strategies = a.strategies.split(",")
    rows = []
    for seed in range(1, a.seeds + 1):
        for s in strategies:
            rows += run_strategy(s, seed, cfg, sft_path, policy, tok, gold, prompts, test, a.rounds, a.batch, work)
    report(rows, a, cfg.reward.label_noise, len(test), time.perf_counter() - t0)


def report(rows: list[dict], a, label_noise: float, held: int, seconds: float) -> None:
    strategies = a.strategies.split(",")
    md, table = summarize(rows, strategies)
    RESULTS.mkdir(parents=True, exist_ok=True)
    title = f"RM accuracy vs labels: {a.seeds} seeds, +{a.batch} rankings/round, label noise {label_noise}, {held} held-out prompts"
    plot(table, RESULTS / "active-selection.png", title)
    text = (f"# Active selection vs random\n\n{title}. Mean ± standard error over seeds of the reward model's "
            f"pairwise accuracy on gold (noise-free) orderings of held-out prompts' responses. Command: "
            f"`python -m bench.active_selection --seeds {a.seeds} --rounds {a.rounds} --batch {a.batch}` "
            f"({seconds:.0f}s).\n\n{md}\n\nPaired with random (same seed and label count, rounds after the "
            f"first):\n\n{paired(rows, strategies)}\n")
    (RESULTS / "active-selection.md").write_text(text)
    (RESULTS / "active-selection.json").write_text(json.dumps(
        {"args": vars(a), "label_noise": label_noise, "held_out": held, "seconds": seconds, "rows": rows}, indent=1))
    print(text)

if __name__ == "__main__":
    main()
