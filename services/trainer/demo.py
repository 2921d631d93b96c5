"""``make demo``: the whole pipeline on the embedded default, then the table and how to chat."""

from __future__ import annotations

import time

from chatrl.services.core.config import RunConfig
from chatrl.services.trainer.pipeline import run_pipeline
from chatrl.services.trainer.report import eval_table
from chatrl.services.trainer.runs import run_endpoints
from chatrl.services.trainer.stages.common import Reporter, setup_runtime


def run_demo(cfg: RunConfig) -> int:
    setup_runtime(cfg)
    t0 = time.perf_counter()
    reporter = Reporter()
    with run_endpoints(cfg, reporter) as endpoints:  # the services, launched locally (configs/tiny.yaml)
        res = run_pipeline(cfg, reporter, endpoints)
    print()
    print(eval_table(res["evals"]))
    print()
    print("wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in res["times"].items()))
    print(f"\nreport: {res['report']} (plots beside it); this run took {time.perf_counter() - t0:.0f}s")
    print(f"\nchat with the result ({res['policy']}):\n"
          "  .venv/bin/chatrl up      # in one terminal: serves runs/<name>/checkpoints/policy (configs/services.yaml)\n"
          "  .venv/bin/chatrl chat    # in another")
    return 0
