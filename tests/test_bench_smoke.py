"""Keeps the benchmark scripts working: every benchmark on the micro size (seconds each), and the runner's
Markdown/JSON output. No timing is asserted — benchmarks are not tests. The TRL peer is skipped when the
``bench`` extra is not installed (``make test`` does not install it)."""

from __future__ import annotations

import json
import math

import pytest

from bench import common
from bench.common import SIZES, Workdir

MICRO = SIZES["micro"]


@pytest.fixture()
def wd():
    w = Workdir()
    yield w
    w.close()


def _check_rows(rows, bench: str, peer: bool = True) -> None:
    assert rows, f"{bench}: no rows"
    for r in rows:
        assert r.bench == bench
        assert r.chatrl["n"] >= 1 and all(math.isfinite(r.chatrl[k]) and r.chatrl[k] > 0
                                          for k in ("min", "median", "max"))
        if peer and r.peer_name:
            assert r.peer["n"] >= 1 and r.ratio["n"] >= 1 and r.ratio["median"] > 0


def test_stats_and_interleave():
    s = common.stats([3.0, 1.0, 2.0])
    assert s == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    calls = []
    out = common.interleave(3, {"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0})
    assert out == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert calls[2:] == ["a", "b", "b", "a", "a", "b"]  # the order alternates between rounds
    row = common.compare("x", "case", "ms", [2.0, 4.0], "peer", [4.0, 4.0], higher_is_better=False)
    assert row.ratio["median"] == pytest.approx(1.5)


def test_generation_micro(wd):
    from bench import generation

    rows = generation.run(MICRO, wd)
    _check_rows(rows, "generation")
    assert {r.case for r in rows} >= {"greedy, batch 1", "sampled, batch 4"}


def test_overhead_micro(wd):
    from bench import overhead

    _check_rows(overhead.run(MICRO, wd), "overhead")


def test_weight_sync_micro(wd):
    from bench import weight_sync

    _check_rows(weight_sync.run(MICRO, wd), "weight_sync")


def test_training_micro(wd):
    from bench import training

    rows, notes = training.run(MICRO, wd)
    _check_rows(rows, "training")
    assert all(r.extra["chatrl_fraction_of_peak"] > 0 for r in rows) and any("peak" in n for n in notes)


@pytest.fixture(scope="module")
def ray_bench():
    import ray

    from bench import stack

    started = not ray.is_initialized()
    stack.init_ray()
    yield
    if started:  # leave a session-wide Ray (tests/conftest.py ray_session) running
        ray.shutdown()


def test_scaling_micro(wd, ray_bench):
    from bench import scaling

    rows, _ = scaling.run(MICRO, wd)
    _check_rows(rows, "scaling")


def test_rl_iteration_micro(wd, ray_bench):
    if not common.trl_available():
        pytest.skip("TRL is not installed: the RL-iteration peer needs the bench extra (pip install -e '.[bench]')")
    from bench import rl_iteration

    rows, notes = rl_iteration.run(MICRO, wd)
    _check_rows(rows, "rl_iteration")
    assert rows[0].peer_name.startswith("TRL")


def test_runner_writes_markdown_and_json(tmp_path):
    import torch

    from bench import run as runner

    threads = torch.get_num_threads()
    rc = runner.main(["--size", "micro", "--only", "overhead", "--out", str(tmp_path)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the runner leaves the test process as it found it
    (md,) = tmp_path.glob("*-micro.md")
    (js,) = tmp_path.glob("*-micro.json")
    data = json.loads(js.read_text())
    assert data["machine"]["cores"] and data["versions"]["torch"]
    assert data["benchmarks"]["overhead"]["rows"]
    text = md.read_text()
    assert "Overhead" in text and "| case |" in text


def test_real_model_rows_on_a_tiny_llama(wd, ray_bench, tmp_path):
    """bench.real_model's three rows (Generate vs HF generate(), an RLOO iteration with LoRA vs TRL in fp32 and in
    bf16, adapter vs full pushes) on a random 2-layer Llama standing in for SmolLM2; the TRL peer only with the
    bench extra."""
    from kit import tiny_hf_dir

    from bench import real_model

    rows, notes = real_model.run(MICRO, wd, tiny_hf_dir(tmp_path / "llama"))
    _check_rows(rows, "real_model")
    gen = [(r.case, r.peer_name) for r in rows if r.case.startswith("Generate")]
    hf = real_model.PEER_GEN
    assert gen == [("Generate, sampled, batch 1", hf), ("Generate, sampled, batch 4", hf),
                   ("Generate, sampled, batch 1, bf16 weights", hf),
                   ("Generate, sampled, batch 1, bf16 weights", f"{hf}, fp32 weights"),
                   ("Generate, sampled, batch 4, bf16 weights", hf),
                   ("Generate, sampled, batch 4, bf16 weights", f"{hf}, fp32 weights")]
    rl = [r for r in rows if r.case.startswith("RLOO iteration with LoRA")]
    assert [r.extra["dtype"] for r in rl] == ["fp32", "bf16"]  # fp32 on both sides, then demo-real's setting
    assert rl[1].case.endswith("bf16 (trainer autocast, services hold bf16 weights)")
    assert all(r.peer_name.startswith("TRL") == common.trl_available() for r in rl)
    if common.trl_available():
        assert rl[1].peer_name.endswith("bf16=True)") and not rl[0].peer_name.endswith("bf16=True)")
    from chatrl.services.core.model import native_bf16

    assert any("no native bf16" in n for n in notes) == (not native_bf16())
    size = next(r for r in rows if r.unit == "MB")
    assert size.chatrl["median"] < size.peer["median"]  # the adapter is a fraction of the full state dict
    assert 0 < size.extra["fraction_of_full"] < 1 and size.extra["rl_loop_MB_pushed_per_iteration"] == \
        pytest.approx(size.chatrl["median"])  # the RL loop pushed exactly the adapter each iteration


def test_real_model_rows_are_skipped_naming_the_fetch_command(wd, tmp_path):
    from bench import real_model
    from bench.run import Skipped

    with pytest.raises(Skipped, match="chatrl model fetch smollm2-135m-instruct"):
        real_model.run(MICRO, wd, tmp_path / "not-fetched")
