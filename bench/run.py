"""``python -m bench.run [--quick] [--only NAME,...]`` (``make bench``): every benchmark against its peer in
one run on this machine; writes ``bench/results/<date>.md`` and ``.json`` (``<date>-quick`` with --quick).

Benchmarks: generation, rl_iteration, weight_sync, overhead, training, scaling (see each module's doc).
The full run takes ≤ 20 minutes on 2 CPU cores; --quick about a third of that. ``--real`` adds real_model
(issue 10's rows on SmolLM2-135M-Instruct: Generate vs HF generate(), an RL iteration vs TRL with LoRA,
bytes per push; ~15 more minutes; skipped with a message when the model is not fetched).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import ROOT, SIZES, Workdir, log, machine, versions

BENCHMARKS = ("generation", "rl_iteration", "weight_sync", "overhead", "training", "scaling", "real_model")
# the order they run in: cheap and independent first, Ray-based last (Ray starts once)
ORDER = ("generation", "overhead", "weight_sync", "training", "scaling", "rl_iteration", "real_model")
OPT_IN = ("real_model",)  # run only when asked (--real, or named in --only): a real model, minutes per row


class Skipped(Exception):
    """A benchmark cannot run on this machine as it is (e.g. its model is not fetched): reported with this
    message, not counted as a failure."""


def run_one(name: str, size, wd: Workdir) -> dict:
    mod = importlib.import_module(f"bench.{name}")
    t = time.perf_counter()
    load0 = os.getloadavg()[0]
    out: dict = {"rows": [], "notes": []}
    try:
        res = mod.run(size, wd)
        rows, notes = res if isinstance(res, tuple) else (res, [])
        out["rows"] = [r.to_dict() for r in rows]
        out["notes"] = list(notes)
    except Skipped as e:
        log(f"{name} skipped: {e}")
        out["skipped"] = str(e)
    except Exception as e:  # noqa: BLE001 — one failed benchmark must not lose the others
        log(f"{name} failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    out["seconds"] = time.perf_counter() - t
    out["notes"].append(f"1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
                        f"({os.cpu_count()} cores)")
    return out


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a first look)")
    ap.add_argument("--size", choices=sorted(SIZES), help="explicit size (full | quick | micro)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--reps", type=int, default=0, help="override the number of interleaved repeats")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the training-side benchmarks (default 1; see bench.common.train_threads)")
    ap.add_argument("--real", action="store_true",
                    help="add the real-model rows (bench.real_model, on SmolLM2-135M-Instruct; opt-in, ~15 min)")
    ap.add_argument("--real-model", default="",
                    help="local HF model directory of the real-model rows (default: the fetched SmolLM2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory (logs, checkpoints)")
    args = ap.parse_args(argv)

    size_name = args.size or ("quick" if args.quick else "full")
    size = SIZES[size_name]
    if args.reps:
        from dataclasses import replace

        size = replace(size, reps=args.reps)
    if args.threads:
        os.environ["CHATRL_BENCH_THREADS"] = str(args.threads)
    if args.real_model:
        os.environ["CHATRL_BENCH_REAL_MODEL"] = args.real_model
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [n for n in ORDER if n not in OPT_IN]
    if args.real and "real_model" not in names:
        names.append("real_model")
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        ap.error(f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in ORDER if n in names]

    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ray_before = _ray_running()
    date = time.strftime("%Y-%m-%d")
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "size": size_name, "reps": size.reps,
               "train_threads": int(os.environ.get("CHATRL_BENCH_THREADS", "1")),
               "machine": machine(), "versions": versions(), "benchmarks": {}}
    wd = Workdir(keep=args.keep)
    t0 = time.perf_counter()
    try:
        for name in names:
            log(f"=== {name} ({size_name}) ===")
            results["benchmarks"][name] = run_one(name, size, wd)
            log(f"=== {name} done in {results['benchmarks'][name]['seconds']:.0f} s ===")
    finally:  # leave the caller's process as it was (the smoke test runs this inside pytest)
        torch.set_num_threads(threads_before)
        if _ray_running() and not ray_before:
            import ray

            ray.shutdown()
        if args.keep:
            log(f"work directory kept: {wd.path}")
        wd.close()
    results["seconds"] = time.perf_counter() - t0
    results["benchmarks"] = {n: results["benchmarks"][n] for n in BENCHMARKS if n in results["benchmarks"]}
    from bench.report import write

    stem = date if size_name == "full" else f"{date}-{size_name}"
    md, js = write(results, Path(args.out), stem)
    print(md.read_text())
    log(f"wrote {md} and {js} in {results['seconds']:.0f} s")
    return 1 if any("error" in b for b in results["benchmarks"].values()) else 0


if __name__ == "__main__":  # run as bench.run, so benchmarks raise the same Skipped class this catches
    from bench.run import main as _main

    sys.exit(_main())
