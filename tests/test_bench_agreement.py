"""``python -m bench.agreement``: the simulated labelers' agreement on a rankings file's tasks, computed by
the code behind GetStats (services/core/agreement.py)."""

from __future__ import annotations

import json

from kit import MICRO, micro_data_overrides

from bench import agreement


def _run(tiny_data, tiny_gold, tmp_path, noise: float) -> dict:
    out = tmp_path / f"agreement-{noise}"
    sets = [*micro_data_overrides(tiny_data), f"data.gold_file={tiny_gold}", f"reward.label_noise={noise}"]
    argv = ["--rankings", str(tiny_data["rankings"]), "--config", str(MICRO), "--labelers", "3", "--seeds", "2",
            "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert agreement.main(argv) == 0
    assert "labeler vs labeler" in out.with_suffix(".md").read_text()
    return json.loads(out.with_suffix(".json").read_text())


def test_noise_free_labelers_agree_fully_and_noisy_ones_less(tiny_data, tiny_gold, tmp_path):
    exact = _run(tiny_data, tiny_gold, tmp_path, 0.0)
    n_tasks = exact["tasks"]
    for r in exact["runs"]:  # no noise: every labeler sorts by the gold score
        assert r["pairwise"] == r["vs_gold_pairwise"] == 1.0 and r["compared"] == 3 * n_tasks  # C(3,2) per task
    noisy = _run(tiny_data, tiny_gold, tmp_path, 2.0)
    assert all(0.3 < r["pairwise"] < 1.0 and r["vs_gold_pairwise"] < 1.0 for r in noisy["runs"])
