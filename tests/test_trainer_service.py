"""trainer control plane through real gRPC: StartRun runs every stage (pretrain, SFT, reward model, PPO,
the pipeline) to SUCCEEDED with checkpoints; WatchRun; ListRuns; cancel; validation; idempotent run ids;
run state survives a trainer restart, and an interrupted run resumes from its checkpoints."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from kit import micro_yaml

from chatrl.clients.lib import TrainerClient
from chatrl.services.proto.chatrl.v1 import trainer_pb2
from chatrl.services.runtime.server import ServerConfig
from chatrl.services.trainer.runs import RunManager
from chatrl.services.trainer.server import TrainerConfig, build


def start_trainer(runs_dir):
    """A trainer whose runs may read the test session's temporary files (the synthetic data) and write
    under ``runs_dir`` only."""
    import tempfile

    srv, svc = build(ServerConfig(port=0, auth_token_env="CHATRL_TEST_TOKEN"), TrainerConfig(
        runs_dir=str(runs_dir), threads=1, data_roots=[tempfile.gettempdir(), *TrainerConfig().data_roots]))
    return srv, svc


@pytest.fixture()
def trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRL_TEST_TOKEN", "tok")
    srv, svc = start_trainer(tmp_path / "runs")
    yield srv, svc
    srv.stop(0)
    svc.close()


def run_to_end(c: TrainerClient, run_id: str) -> list:
    """WatchRun until the run is over; the events (the last state change must be SUCCEEDED)."""
    events = list(c.watch_run(run_id, timeout=300))
    states = [e.state_change.new_state for e in events if e.WhichOneof("payload") == "state_change"]
    assert states[-1] == trainer_pb2.RUN_STATE_SUCCEEDED, [e.log_line for e in events if e.log_line][-8:]
    return events


def test_start_run_runs_each_stage(trainer, tiny_data, tiny_gold, tmp_path, ray_session):
    """StartRun with STAGE_PRETRAIN, STAGE_SFT and STAGE_REWARD_MODEL (sharing one run_dir, each starting
    from the one before), then STAGE_PPO in its own run given those SFT and reward-model checkpoints: the
    trainer launches the services for it, seeds them, runs the RL loop through Ray, and stops them."""
    srv, _ = trainer
    shared = tmp_path / "runs" / "shared"  # a service-started run writes inside the trainer's runs_dir
    with TrainerClient(srv.address, token="tok") as c:
        for stage in ("pretrain", "sft", "reward"):
            c.start_run(stage, micro_yaml(tiny_data, run_dir=str(shared)), run_id=f"each-{stage}")
            run_to_end(c, f"each-{stage}")
            assert (shared / "checkpoints" / stage / "final" / "manifest.json").exists()
        sft_ck, rm_ck = shared / "checkpoints" / "sft" / "final", shared / "checkpoints" / "reward" / "final"
        c.start_run("ppo", micro_yaml(tiny_data, tiny_gold), run_id="each-ppo",
                    overrides={"ppo.policy_init": str(sft_ck), "ppo.reward_model": str(rm_ck), "ppo.iterations": "2"})
        events = run_to_end(c, "each-ppo")
        ppo = [e for e in events if e.WhichOneof("payload") == "metrics" and e.progress.stage == trainer_pb2.STAGE_PPO]
        # the launched policy-inference had no model: the SFT weights went in as version 1, then a push per iteration
        assert [e.metrics.values["policy_version"] for e in ppo] == [2.0, 3.0]
        assert all("gold_train" in e.metrics.values and "kl" in e.metrics.values for e in ppo)
        cks = c._call(c.stub.ListCheckpoints, trainer_pb2.ListCheckpointsRequest(
            run_id="each-ppo", stage=trainer_pb2.STAGE_PPO)).checkpoints
        assert cks and {trainer_pb2.Stage.Name(k.stage) for k in cks} == {"STAGE_PPO"}
        out = c.get_run("each-ppo").output_dir
        logs = [f"{n}.log" for n in ("policy", "reward", "reference", "feedback")]
        assert sorted(p.name for p in (Path(out) / "logs").iterdir()) == sorted(logs)  # launched for the run
        # ... and stopped after it: each drained on SIGTERM
        assert all("draining" in (Path(out) / "logs" / n).read_text() for n in logs)
        # ListRuns: newest first, filtered by state, paged
        runs = c.list_runs()
        assert [r.run_id for r in runs] == ["each-ppo", "each-reward", "each-sft", "each-pretrain"]
        assert [trainer_pb2.Stage.Name(r.stage) for r in runs] == ["STAGE_PPO", "STAGE_REWARD_MODEL", "STAGE_SFT",
                                                                   "STAGE_PRETRAIN"]
        page = c._call(c.stub.ListRuns, trainer_pb2.ListRunsRequest(page_size=3))
        rest = c._call(c.stub.ListRuns, trainer_pb2.ListRunsRequest(page_size=3, page_token=page.next_page_token))
        assert [r.run_id for r in page.runs] + [r.run_id for r in rest.runs] == [r.run_id for r in runs]
        assert rest.next_page_token == ""
        failed = c._call(c.stub.ListRuns, trainer_pb2.ListRunsRequest(states=[trainer_pb2.RUN_STATE_FAILED]))
        assert list(failed.runs) == []


def test_pipeline_run_streams_progress_and_lists_checkpoints(trainer, tiny_data, tiny_gold, ray_session):
    """StartRun(PIPELINE) drives the whole loop: stages, services (launched by the trainer), Ray rollouts, PPO."""
    srv, _ = trainer
    with TrainerClient(srv.address, token="tok") as c:
        run = c.start_run("pipeline", micro_yaml(tiny_data, tiny_gold), overrides={"pretrain.steps": "12"},
                          run_id="r1")
        assert run.run_id == "r1" and run.state in (trainer_pb2.RUN_STATE_PENDING, trainer_pb2.RUN_STATE_RUNNING)
        events = list(c.watch_run("r1", timeout=300))
        states = [trainer_pb2.RunState.Name(e.state_change.new_state) for e in events
                  if e.WhichOneof("payload") == "state_change"]
        assert states[-1] == "RUN_STATE_SUCCEEDED", [e.log_line for e in events]
        assert "RUN_STATE_RUNNING" in states
        metrics = [e for e in events if e.WhichOneof("payload") == "metrics"]
        stages = {trainer_pb2.Stage.Name(e.progress.stage) for e in metrics}
        assert {"STAGE_PRETRAIN", "STAGE_SFT", "STAGE_REWARD_MODEL", "STAGE_PPO"} <= stages
        assert any("loss" in e.metrics.values for e in metrics)
        assert [e.sequence for e in events] == sorted(e.sequence for e in events)
        # replay from a sequence number
        tail = list(c.watch_run("r1", after_sequence=events[-3].sequence))
        assert [e.sequence for e in tail] == [e.sequence for e in events[-2:]]
        got = c.get_run("r1")
        assert got.state == trainer_pb2.RUN_STATE_SUCCEEDED and got.progress.step > 0
        assert "pretrain/eval_loss" in got.latest_metrics
        cks = c.list_checkpoints("r1")
        assert {trainer_pb2.Stage.Name(k.stage) for k in cks} >= {"STAGE_PRETRAIN", "STAGE_SFT", "STAGE_REWARD_MODEL",
                                                                  "STAGE_PPO"}
        assert all(len(k.sha256) == 64 and k.size_bytes > 0 for k in cks)
        # the same StartRun again is idempotent; a different one with the same id is refused
        assert c.start_run("pipeline", micro_yaml(tiny_data, tiny_gold), overrides={"pretrain.steps": "12"},
                           run_id="r1").run_id == "r1"
        with pytest.raises(grpc.RpcError) as e:
            c.start_run("sft", micro_yaml(tiny_data), run_id="r1")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("kwargs,code,field", [
    ({"stage": "pretrain", "config_yaml": "pretrain: {stepz: 1}"}, grpc.StatusCode.INVALID_ARGUMENT, "pretrain.stepz"),
    ({"stage": "pretrain", "config_yaml": "[1, 2"}, grpc.StatusCode.INVALID_ARGUMENT, "config_yaml"),
    ({"stage": "pretrain", "run_id": "../evil"}, grpc.StatusCode.INVALID_ARGUMENT, "run_id"),
])
def test_start_run_validation(trainer, kwargs, code, field):
    srv, _ = trainer
    with TrainerClient(srv.address, token="tok") as c, pytest.raises(grpc.RpcError) as e:
        c.start_run(**kwargs)
    assert e.value.code() == code and field in e.value.details()


def test_errors_auth_and_not_found(trainer):
    srv, _ = trainer
    with TrainerClient(srv.address, token="") as anon:
        with pytest.raises(grpc.RpcError) as e:
            anon.start_run("pretrain")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for call in (lambda: anon.get_run("nope"), lambda: list(anon.watch_run("nope")),
                     lambda: anon.list_checkpoints("nope")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            anon._call(anon.stub.StartRun, trainer_pb2.StartRunRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cancel_a_running_run(trainer, tiny_data):
    srv, _ = trainer
    with TrainerClient(srv.address, token="tok") as c:
        c.start_run("pretrain", micro_yaml(tiny_data), overrides={"pretrain.steps": "100000"}, run_id="long")
        for e in c.watch_run("long"):
            if e.WhichOneof("payload") == "metrics":
                c.cancel_run("long", reason="test")
            if e.WhichOneof("payload") == "state_change" and e.state_change.new_state == trainer_pb2.RUN_STATE_CANCELLED:
                break
        assert c.get_run("long").state == trainer_pb2.RUN_STATE_CANCELLED


def test_run_state_survives_restart_and_interrupted_runs_resume(tmp_path, tiny_data):
    import threading

    started = threading.Event()
    release = threading.Event()
    calls = []

    def blocking_runner(stage, cfg, rep):
        calls.append(stage)
        started.set()
        release.wait(30)
        rep.check_cancelled()

    m1 = RunManager(tmp_path, blocking_runner)
    m1.start("sft", micro_yaml(tiny_data), {}, run_id="a")
    assert started.wait(10)
    # the process "dies": a new manager reads the persisted records
    m2 = RunManager(tmp_path, lambda stage, cfg, rep: calls.append(f"resumed-{stage}"))
    evs, over = m2.events_after("a", 0, timeout=10)
    while not over:
        evs, over = m2.events_after("a", evs[-1].seq if evs else 0, timeout=10)
    assert m2.get("a").state == "SUCCEEDED" and m2.get("a").restarts == 1
    assert "resumed-sft" in calls
    release.set()
    m1.close()
    m2.close()


def test_a_restarted_trainer_resumes_an_interrupted_run_from_its_checkpoints(tmp_path, tiny_data, monkeypatch):
    """The trainer stops mid-run (its runs go back to PENDING); a new trainer on the same runs directory
    takes the run up again through its checkpoints — the stage resumes at a checkpointed step, not 0."""
    import re

    monkeypatch.setenv("CHATRL_TEST_TOKEN", "tok")
    srv, svc = start_trainer(tmp_path / "runs")
    over = {"pretrain.steps": "100000", "pretrain.ckpt_every": "5", "pretrain.log_every": "5"}
    with TrainerClient(srv.address, token="tok") as c:
        c.start_run("pretrain", micro_yaml(tiny_data), overrides=over, run_id="long")
        for e in c.watch_run("long"):
            if e.WhichOneof("payload") == "metrics" and e.progress.step >= 10:  # step 5 and 10 are checkpointed
                break
    srv.stop(0)
    svc.close()
    srv, svc = start_trainer(tmp_path / "runs")
    try:
        with TrainerClient(srv.address, token="tok") as c:
            resumed_at = None
            for e in c.watch_run("long"):
                m = re.search(r"resuming from step (\d+)", e.log_line)
                if m:
                    resumed_at = int(m.group(1))
                if resumed_at is not None and e.WhichOneof("payload") == "metrics" and e.progress.step > resumed_at:
                    break
            assert resumed_at is not None and resumed_at >= 10
            run = c.get_run("long")
            assert run.state == trainer_pb2.RUN_STATE_RUNNING and run.progress.step > resumed_at
            c.cancel_run("long", reason="test over")
            events = list(c.watch_run("long", timeout=60))
            assert events[-1].state_change.new_state == trainer_pb2.RUN_STATE_CANCELLED
    finally:
        srv.stop(0)
        svc.close()
