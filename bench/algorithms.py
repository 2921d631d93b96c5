"""``python -m bench.algorithms``: PPO vs GRPO vs RLOO vs REINFORCE++ vs DPO, matched, N seeds each.

    python -m bench.algorithms                      # configs/compare_tiny.yaml, 5 methods x 3 seeds (after make demo)
    python -m bench.algorithms --quick              # the micro config end to end, 1 seed (minutes; the smoke test)
    python -m bench.algorithms --methods grpo,dpo --seeds 1 --set ppo.iterations=30
    python -m bench.algorithms --config configs/compare_smollm2.yaml --seeds 1   # the real model (after make demo-real)

**Matched.** Every run is a ``chatrl pipeline run`` with ``pipeline.reuse_from``: it copies the same
pre-training, SFT model, round-0 rankings (K responses of the SFT model per prompt, ranked by the simulated
labelers) and round-0 reward model, so only the method differs. The RL methods (``ppo.algorithm``) then run
one round against that reward model with the same prompts per iteration, samples per prompt, iterations and
``max_new_tokens``: the same number of sampled responses (the token count follows each policy's response
lengths, bounded alike). DPO (``pipeline.method: dpo``) samples nothing while it trains: it learns from the
C(K,2) pairs of those same rankings — exactly the data the RL methods' reward model was fitted on — so its
matched budget is the rankings (its throughput is pair updates/s; the reward model's training time, which
the RL methods also needed, is not in any method's wall time). Seeds are ``seed + i`` of the config; the
held-out evaluation (gold labeler, ``pipeline.eval_prompts`` prompts, fixed sampling seed) is the same for
every run, and the SFT row is evaluated once and shared.

Runs go one after another (the machine has 2 cores), each in its own process with its own services, into
``<runs>/<method>-s<seed>``; a finished one is read back, not rerun, and an interrupted one resumes from its
checkpoints (its wall time then counts only the resumed part, flagged in the JSON). Results:
``bench/results/algorithms-<date>.md`` / ``.json`` (``-quick`` with --quick, ``-<config name>`` with another
config than the default, e.g. ``-smollm2`` for ``configs/compare_smollm2.yaml``) and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RAY_ENV, ROOT, log, machine, versions

METHODS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")
DEFAULT_CONFIG = "configs/compare_tiny.yaml"
QUICK_CONFIG = "configs/micro.yaml"
REUSED = ("checkpoints/sft", "checkpoints/reward_r0", "data/rankings_r0.jsonl")


def method_overrides(method: str) -> list[str]:
    if method == "dpo":
        return ["pipeline.method=dpo"]
    return ["pipeline.method=rl", f"ppo.algorithm={method}"]


def run_config(config: str, sets: list[str], method: str, seed_offset: int, run_dir: Path, reuse_from: Path):
    """The validated config of one method/seed run (bad settings fail here, before any run starts)."""
    from chatrl.services.core.config import load_config

    base = load_config(config, sets)
    return load_config(config, [*sets, *method_overrides(method), f"seed={base.seed + seed_offset}",
                                f"run_dir={run_dir}", f"name={base.name}-{method}-s{base.seed + seed_offset}",
                                f"pipeline.reuse_from={reuse_from}"])


def run_pipeline_process(cfg, log_file: Path) -> float:
    """``chatrl pipeline run`` of ``cfg`` in its own process (its own services and Ray); returns its wall
    time. The resolved config is written next to the run so the run can be repeated by hand."""
    import yaml

    cfg_file = Path(cfg.run_dir) / "bench-config.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # a busy machine must not fail a run that was only slow to start its Ray node (default wait 60 s)
    env = {"RAY_raylet_start_wait_time_s": "300", **os.environ, **RAY_ENV, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)  # each run starts (and stops) its own local Ray
    t = time.perf_counter()
    with open(log_file, "ab") as out:
        rc = subprocess.run([sys.executable, "-m", "chatrl.services.cli", "pipeline", "run", "-c", str(cfg_file)],
                            env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"pipeline run exited {rc} (log {log_file}):\n" + "\n".join(tail))
    wall = time.perf_counter() - t
    (Path(cfg.run_dir) / "bench-run.json").write_text(json.dumps({"run_wall_seconds": wall}) + "\n")
    return wall


def ensure_base(config: str, sets: list[str], reuse_from: Path, build: bool) -> None:
    """The run every method starts from. Built here only when the caller named no existing one (--quick, or a
    config without ``pipeline.reuse_from``): the config's own pipeline with a 1-iteration PPO round, whose
    policy nobody uses — only the stages before it are reused."""
    if all((reuse_from / rel).exists() for rel in REUSED):
        return
    if not build:
        raise SystemExit(f"bench.algorithms: {reuse_from} has no SFT model, round-0 rankings and reward model to "
                         f"start from — run its pipeline first (`make demo` for runs/tiny)")
    from chatrl.services.core.config import load_config

    log(f"building the shared starting point in {reuse_from} (pre-training, SFT, round-0 rankings and RM)")
    cfg = load_config(config, [*sets, f"run_dir={reuse_from}", "pipeline.reuse_from=''", "pipeline.method=rl",
                               "ppo.algorithm=ppo", "ppo.iterations=1"])
    reuse_from.mkdir(parents=True, exist_ok=True)
    run_pipeline_process(cfg, reuse_from / "bench.log")


def n_pairs(rankings_file: Path) -> int:
    from chatrl.services.core.formats import load_rankings

    return sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in load_rankings(rankings_file))


def read_result(cfg, method: str, seed: int) -> dict | None:
    """One finished run's figures from its pipeline state, or None if it has not finished."""
    from chatrl.services.trainer.pipeline import round_stage
    from chatrl.services.trainer.report import BASE_LABEL

    shared_evals = (BASE_LABEL, "SFT")  # evaluated once: neither depends on the method or the seed

    state_file = Path(cfg.run_dir) / "pipeline.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    run_file = Path(cfg.run_dir) / "bench-run.json"  # the whole process, services and evaluation included
    resources = Path(cfg.run_dir) / "resources.json"  # what `chatrl pipeline run` measured: peak PSS of the tree
    stage, label = round_stage(cfg, 0)
    ev = state.get("evals", {}).get(label)
    if ev is None:
        return None
    seconds = float(state.get("times", {}).get(stage, float("nan")))
    hist = state.get("history", {}).get(stage, [])
    out = {"method": method, "label": label, "seed": seed, "run_dir": str(cfg.run_dir),
           "gold": ev["gold"], "gold_se": ev["gold_se"], "rm": ev.get("rm"), "kl": ev["kl"],
           "length": ev["length"], "n_eval": ev["n"], "round_seconds": seconds,
           "run_wall_seconds": json.loads(run_file.read_text())["run_wall_seconds"] if run_file.exists() else None,
           "peak_pss_gib": json.loads(resources.read_text()).get("peak_pss_gib") if resources.exists() else None,
           "sft_eval": state["evals"].get("SFT"), "shared_evals": {k: state["evals"][k] for k in shared_evals
                                                                   if k in state["evals"]}}
    if method == "dpo":
        pairs = n_pairs(Path(cfg.run_dir) / "data" / "rankings_r0.jsonl")
        out.update(pairs=pairs, pair_updates=pairs * cfg.dpo.epochs, samples=0,
                   throughput=pairs * cfg.dpo.epochs / seconds, throughput_unit="pair updates/s")
        out["resumed"] = False
    else:
        pc = cfg.ppo
        samples = sum(h.get("samples", 0.0) for h in hist)
        out.update(samples=int(samples), throughput=samples / seconds, throughput_unit="samples/s",
                   samples_configured=pc.iterations * pc.prompts_per_iteration * pc.samples_per_prompt)
        out["resumed"] = len(hist) < pc.iterations  # history and time cover only the resumed iterations
    return out


def prefill_shared_evals(run_dir: Path, shared: dict) -> None:
    """Give a fresh run the SFT (and base) evaluations of an earlier run of this comparison: the pipeline
    skips evaluations its state already has, and these depend on neither the method nor the seed."""
    state_file = run_dir / "pipeline.json"
    if shared and not state_file.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"evals": shared, "history": {}, "times": {}}, indent=1))


# --- summary -------------------------------------------------------------------------------------------------

def spread(xs: list[float]) -> dict:
    """Mean, standard error of the mean over seeds (std/√n; None for one seed), min and max."""
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return {"n": 0}
    n, mean = len(xs), sum(xs) / len(xs)
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return {"n": n, "mean": mean, "se": se, "min": min(xs), "max": max(xs)}


def summarise(runs: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        out[m] = {"label": rs[0]["label"].rsplit(" round", 1)[0], "seeds": [r["seed"] for r in rs],
                  "unit": rs[0]["throughput_unit"], "gold_se_eval": rs[0]["gold_se"] if len(rs) == 1 else None,
                  **{k: spread([r[k] for r in rs]) for k in ("gold", "rm", "kl", "length", "round_seconds",
                                                             "throughput")}}
    return out


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    a = abs(x)
    f = ".3f" if a < 10 else ".1f" if a < 100 else ".0f"
    return format(x, ("+" if signed else "") + f)


def _cell(s: dict, signed: bool = False) -> str:
    if not s.get("n"):
        return "–"
    if s["n"] == 1:
        return _num(s["mean"], signed)
    return f"{_num(s['mean'], signed)} [{_num(s['min'], signed)}, {_num(s['max'], signed)}]"


def _gold(s: dict, eval_se: float | None) -> str:
    if not s.get("n"):
        return "–"
    se = s["se"] if s["n"] > 1 else eval_se
    rng = f" [{_num(s['min'], True)}, {_num(s['max'], True)}]" if s["n"] > 1 else ""
    return f"{_num(s['mean'], True)} ± {_num(se)}{rng}"


def table(res: dict) -> str:
    """The README-ready table: one row per method (mean over seeds, [min, max] over seeds) after the SFT row."""
    n_eval = int(res["n_eval"]) if res.get("n_eval") else "?"
    lines = [f"| method ({res['seeds']} seed{'s' if res['seeds'] != 1 else ''}; held-out n={n_eval}) | gold score "
             "| RM score | KL to SFT | words | wall time (s) | throughput |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    sft = res.get("sft_eval")
    if sft:
        lines.append(f"| SFT (the start of every run) | {_num(sft['gold'], True)} ± {_num(sft['gold_se'])} | "
                     f"{_num(sft.get('rm'), True)} | 0 | {_num(sft['length'])} | – | – |")
    for s in res["methods"].values():
        lines.append(f"| {s['label']} | {_gold(s['gold'], s['gold_se_eval'])} | {_cell(s['rm'], True)} | "
                     f"{_cell(s['kl'])} | {_cell(s['length'])} | {_cell(s['round_seconds'])} | "
                     f"{_cell(s['throughput'])} {s['unit']} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    m = res["machine"]
    runs = res["runs"]
    resumed = [f"{r['method']} s{r['seed']}" for r in runs if r.get("resumed")]
    rl = next((r for r in runs if r["method"] != "dpo"), None)
    dpo = next((r for r in runs if r["method"] == "dpo"), None)
    lines = [f"# chatrl algorithm comparison — {res['date']}", "",
             f"Reproduce: `{res['command']}` (config `{res['config']}`, from `{res['reuse_from']}`).", "",
             "Every run starts from the same pre-training, SFT model and round-0 rankings; the RL methods also "
             "from the same round-0 reward model, with the same prompts × samples per iteration and iterations. "
             "DPO trains on the pairs of those same rankings (the data the reward model was fitted on) and samples "
             "nothing itself. Gold: the simulated labeler (never seen by any reward model) on held-out prompts; "
             "mean over seeds ± its standard error over seeds (one seed: ± the evaluation's standard error), "
             "[min, max] over seeds. Other cells: mean [min, max] over seeds. Wall time and throughput: the "
             "method's round only (RL: rollouts through the services + updates + weight pushes; DPO: reference "
             "log-probs + updates); the reward model's training, which the RL methods needed and DPO did not, "
             "is in no row.", "",
             table(res), ""]
    if rl:
        lines.append(f"- RL budget per run: {rl['samples']} sampled responses ({res['rl_budget']}).")
    if dpo:
        lines.append(f"- DPO budget per run: {dpo['pairs']} pairs from the round-0 rankings × {res['dpo_epochs']} "
                     f"epoch(s) = {dpo['pair_updates']} pair updates, 0 sampled responses.")
    if resumed:
        lines.append(f"- Resumed after an interruption (wall time covers the resumed part only): {', '.join(resumed)}.")
    for r in res.get("failed", []):
        lines.append(f"- **Failed**: {r['method']} seed {r['seed']}: {r['error'].splitlines()[0]}")
    lines += ["- Per run (gold ± eval SE, RM, KL, round seconds, peak memory of the run's processes): " + "; ".join(
        f"{r['method']} s{r['seed']} {r['gold']:+.3f} ± {r['gold_se']:.3f}, {_num(r['rm'], True)}, {r['kl']:.2f}, "
        f"{r['round_seconds']:.0f}, " + (f"{r['peak_pss_gib']:.1f} GiB" if r.get("peak_pss_gib") else "–")
        for r in runs),
        "- Machine: " + ", ".join(f"{k} {m[k]}" for k in m) + f"; the runs took {res['runs_seconds']:.0f} s "
        "in all (their processes: service and Ray start-up and evaluation included).", ""]
    return "\n".join(lines)


# --- command -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.algorithms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=0, help="seeds per method (default 3; 1 with --quick)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--config", default="", help=f"run config (default {DEFAULT_CONFIG}; {QUICK_CONFIG} with --quick)")
    ap.add_argument("--reuse-from", default="", help="the run directory every method starts from (default the "
                    "config's pipeline.reuse_from, else <runs>/base, built first)")
    ap.add_argument("--runs", default="", help="where the runs go (default runs/compare-<config name>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    ap.add_argument("--quick", action="store_true", help="the micro config, 1 seed: the whole path in minutes")
    ap.add_argument("--retries", type=int, default=1, help="reruns of a failed run (each resumes where it stopped)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    args = ap.parse_args(argv)

    from chatrl.services.core.config import load_config

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--methods: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    seeds = args.seeds or (1 if args.quick else 3)
    if seeds < 1:
        ap.error("--seeds must be >= 1")
    config = args.config or (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    if not Path(config).exists() and (ROOT / config).exists():  # the repository's configs, from any directory
        config = str(ROOT / config)
    base = load_config(config, args.set)
    runs_root = Path(args.runs or f"runs/compare-{base.name}").resolve()
    reuse_from = Path(args.reuse_from or base.pipeline.reuse_from or runs_root / "base").resolve()
    build_base = not (args.reuse_from or base.pipeline.reuse_from)
    plan = [(m, i, run_config(config, args.set, m, i, runs_root / f"{m}-s{base.seed + i}", reuse_from))
            for i in range(seeds) for m in methods]  # every config checked before the first run; seed-major
    t0 = time.perf_counter()
    ensure_base(config, args.set, reuse_from, build_base)
    runs, failed, shared = [], [], {}
    for m, _, cfg in plan:
        seed = cfg.seed
        r = read_result(cfg, m, seed)
        if r is None:
            prefill_shared_evals(Path(cfg.run_dir), shared)
            log(f"{m} seed {seed}: running in {cfg.run_dir}")
            err = None
            for attempt in range(1 + args.retries):  # a retry resumes from the run's checkpoints
                try:
                    run_pipeline_process(cfg, Path(cfg.run_dir) / "bench.log")
                    err = None
                    break
                except RuntimeError as e:  # e.g. Ray's node start timing out on a busy machine
                    err = e
                    log(f"{m} seed {seed} failed (attempt {attempt + 1}): {e}")
            if err is not None:  # one failed run must not lose the others
                failed.append({"method": m, "seed": seed, "error": str(err)})
                continue
            r = read_result(cfg, m, seed)
            log(f"{m} seed {seed}: gold {r['gold']:+.3f} ± {r['gold_se']:.3f}, KL {r['kl']:.2f}, "
                f"{r['round_seconds']:.0f} s (run {r['run_wall_seconds']:.0f} s)")
        else:
            log(f"{m} seed {seed}: finished earlier in {cfg.run_dir}, read back")
        shared = shared or r["shared_evals"]
        runs.append(r)
    pc = base.ppo
    res = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config, "overrides": args.set,
           "reuse_from": str(reuse_from), "seeds": seeds,
           "command": "python -m bench.algorithms" + (" --quick" if args.quick else "")
           + (f" --seeds {seeds}" if seeds != (1 if args.quick else 3) else "")
           + (f" --methods {','.join(methods)}" if methods != list(METHODS) else "")
           + (f" --config {config}" if args.config else "") + "".join(f" --set {s}" for s in args.set),
           "rl_budget": f"{pc.iterations} iterations × {pc.prompts_per_iteration} prompts × "
           f"{pc.samples_per_prompt} samples, ≤ {pc.max_new_tokens} new tokens each",
           "dpo_epochs": base.dpo.epochs, "n_eval": runs[0]["n_eval"] if runs else None,
           "sft_eval": shared.get("SFT"), "methods": summarise(runs), "runs": runs, "failed": failed,
           "machine": machine(), "versions": versions(), "seconds": time.perf_counter() - t0,
           "runs_seconds": sum(r["run_wall_seconds"] or 0.0 for r in runs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the default (tiny) comparison keeps the short name; any other config's results are named after it
    named = "-quick" if args.quick else "" if config.endswith(DEFAULT_CONFIG) else f"-{base.name}"
    stem = f"algorithms-{time.strftime('%Y-%m-%d')}{named}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    print(table(res))
    log(f"wrote {out / stem}.md and .json in {res['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
