"""The algorithm comparison (``python -m bench.algorithms``): on the micro config it runs each method as a
pipeline run from one shared starting point and writes a well-formed table; a second invocation reads the
finished runs back instead of rerunning them. The summary over seeds is checked against hand-computed
figures. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
from kit import micro_data_overrides

from bench import algorithms


def test_spread_over_seeds_is_mean_standard_error_and_range():
    s = algorithms.spread([1.0, 2.0, 3.0])
    # std (ddof 1) = 1, so the standard error of the mean over 3 seeds is 1/√3
    assert s == {"n": 3, "mean": 2.0, "se": pytest.approx(1 / math.sqrt(3)), "min": 1.0, "max": 3.0}
    assert algorithms.spread([0.5])["se"] is None  # one seed: no spread to estimate
    assert algorithms.spread([])["n"] == 0


def test_table_rows_show_the_mean_the_seed_error_and_the_range():
    run = {"method": "grpo", "label": "GRPO round 0", "throughput_unit": "samples/s", "gold_se": 0.1, "rm": 0.5,
           "kl": 2.0, "length": 10.0, "round_seconds": 100.0, "throughput": 6.4}
    runs = [{**run, "seed": 1, "gold": 1.0}, {**run, "seed": 2, "gold": 2.0, "kl": 4.0}]
    res = {"seeds": 2, "n_eval": 200, "sft_eval": {"gold": 0.5, "gold_se": 0.1, "rm": 0.2, "length": 12.0},
           "methods": algorithms.summarise(runs)}
    head, rule, sft, grpo = algorithms.table(res).splitlines()
    assert "2 seeds" in head and "n=200" in head and rule.startswith("|---|")
    assert sft.startswith("| SFT") and "+0.500 ± 0.100" in sft
    # gold: mean 1.5 ± std/√2 = 0.5, range [1, 2]; KL: mean 3 [2, 4]
    assert grpo.split(" | ")[:4] == ["| GRPO", "+1.500 ± 0.500 [+1.000, +2.000]", "+0.500 [+0.500, +0.500]",
                                       "3.000 [2.000, 4.000]"]
    assert grpo.endswith("| 100 [100, 100] | 6.400 [6.400, 6.400] samples/s |")


def test_quick_comparison_runs_each_method_once_and_writes_the_table(tiny_data, tiny_gold, tmp_path, capsys):
    sets = [s for s in micro_data_overrides(tiny_data) if not s.startswith("data.rankings_file")] + [
        f"data.gold_file={tiny_gold}", "ppo.iterations=2", "pipeline.eval_prompts=4", "reward.num_prompts=12",
        "dpo.epochs=1"]
    argv = ["--quick", "--methods", "grpo,dpo", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            *(a for s in sets for a in ("--set", s))]
    assert algorithms.main(argv) == 0
    table = capsys.readouterr().out
    (js,) = (tmp_path / "out").glob("algorithms-*-quick.json")
    (md,) = (tmp_path / "out").glob("algorithms-*-quick.md")
    res = json.loads(js.read_text())
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("grpo", 7), ("dpo", 7)]  # micro.yaml's seed
    grpo, dpo = res["runs"]
    assert grpo["samples"] == 2 * 6 * 2 and grpo["throughput_unit"] == "samples/s"  # iterations × prompts × n
    assert dpo["samples"] == 0 and dpo["pairs"] == 12 * 3 and dpo["throughput_unit"] == "pair updates/s"  # C(3,2)
    assert all(r["n_eval"] == 4 and math.isfinite(r["gold"]) and r["rm"] is not None for r in res["runs"])
    assert res["sft_eval"]["gold"] == grpo["shared_evals"]["SFT"]["gold"] == dpo["shared_evals"]["SFT"]["gold"]
    lines = table.strip().splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| SFT (the start of every run)", "| GRPO", "| DPO"]
    assert table.strip() in md.read_text()
    # a second invocation reads both finished runs back: nothing is rerun
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*-s7/bench.log")}
    assert len(logs) == 2
    assert algorithms.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert json.loads(js.read_text())["runs"] == res["runs"]
