"""``python -m bench.agreement``: how much the demo's simulated labelers agree with each other.

    python -m bench.agreement                       # the demo's round-0 comparisons (after make demo)
    python -m bench.agreement --rankings FILE --config CONFIG --labelers 3 --seeds 5

InstructGPT reports ≈ 73 % pairwise agreement among its labelers (and ≈ 77 % with the held-out ones). This
puts the same figure on the simulated labelers that stand in for people in the demo: every comparison task
of a rankings file (the prompt and its K responses, as the feedback service exported them) is ranked
independently by ``--labelers`` simulated labelers — the gold preference function plus Gumbel noise of the
config's ``reward.label_noise``, exactly as :func:`chatrl.services.trainer.labels.label_with_simulated_labelers`
ranks them — and :mod:`chatrl.services.core.agreement` (the code behind GetStats and /metrics) compares
every pair of labelers on every task: mean pairwise agreement and Kendall's τ-b, and each labeler against
the noise-free gold order. ``--seeds`` repeats with fresh noise (mean ± standard error over seeds).
Results: ``bench/results/agreement.{md,json}`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, log

DEFAULT_RANKINGS = "runs/tiny/data/rankings_r0.jsonl"


def agreement_once(gold, rows: list[dict], labelers: int, noise: float, seed: int) -> dict[str, float]:
    from chatrl.services.core import agreement
    from chatrl.services.core.seeding import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "agreement"))
    ranked, versus_gold = [], agreement.Summary()
    for i, r in enumerate(rows):
        prompt = r.get("messages") or r["prompt"]
        finished = r.get("finished") or [True] * len(r["responses"])
        truth = agreement.tiers(gold.rank(prompt, r["responses"], finished))
        for who in range(labelers):
            order = gold.rank(prompt, r["responses"], finished, rng, noise)
            tiers = agreement.tiers(order)
            ranked.append((str(i), f"labeler-{who}", tiers))
            versus_gold.add(*agreement.compare(tiers, truth))
    overall, _ = agreement.summarize(ranked)
    return {"pairwise": overall.pairwise, "kendall_tau": overall.kendall_tau, "compared": overall.compared,
            "vs_gold_pairwise": versus_gold.pairwise, "vs_gold_kendall_tau": versus_gold.kendall_tau}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rankings", default=DEFAULT_RANKINGS, help=f"comparison tasks (default {DEFAULT_RANKINGS})")
    ap.add_argument("--config", default="configs/tiny.yaml", help="the run config (gold labeler, label_noise)")
    ap.add_argument("--labelers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "agreement"))
    args = ap.parse_args(argv)
    if args.labelers < 2 or args.seeds < 1:
        ap.error("--labelers must be >= 2 and --seeds >= 1")
    return run(args, ap)


def run(args, ap) -> int:
    from chatrl.services.core.config import load_config
    from chatrl.services.core.gold import GoldLabeler
    from chatrl.services.trainer.stages.data import resolve_data

    t0 = time.perf_counter()
    path = Path(args.rankings)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    if not path.exists():
        ap.error(f"{path}: no such file (run `make demo` first, or pass --rankings)")
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    cfg = load_config(args.config if Path(args.config).exists() else str(ROOT / args.config), args.set)
    data = resolve_data(cfg)
    if not data.gold:
        ap.error("the config has no gold labeler (data.gold_file)")
    gold = GoldLabeler.load(data.gold)
    noise = cfg.reward.label_noise
    runs = [agreement_once(gold, rows, args.labelers, noise, cfg.seed + s) for s in range(args.seeds)]

    def stat(key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs]
        se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
        return statistics.fmean(vals), se

    k = len(rows[0]["responses"])
    lines = [f"# Simulated labelers' agreement — {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             f"Reproduce: `python -m bench.agreement --rankings {args.rankings} --config {args.config} "
             f"--labelers {args.labelers} --seeds {args.seeds}`", "",
             f"{len(rows)} comparison tasks (K = {k}) of `{args.rankings}`, each ranked by {args.labelers} simulated "
             f"labelers (gold + Gumbel noise {noise}); {args.seeds} seeds of fresh noise, mean ± SE over seeds.", "",
             "| measure | pairwise agreement | Kendall's τ-b |", "|---|---:|---:|"]
    for label, key in (("labeler vs labeler", ""), ("labeler vs the noise-free gold order", "vs_gold_")):
        (pw, pw_se), (tau, tau_se) = stat(f"{key}pairwise"), stat(f"{key}kendall_tau")
        lines.append(f"| {label} | {pw:.3f} ± {pw_se:.3f} | {tau:.3f} ± {tau_se:.3f} |")
    lines += ["", "InstructGPT reports ≈ 0.73 pairwise agreement among its labelers.",
              f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "label_noise": noise, "tasks": len(rows),
                                                    "k": k, "runs": runs}, indent=1) + "\n")
    log(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
