"""trainer control plane through real gRPC: StartRun → WatchRun → SUCCEEDED with checkpoints;
cancel; validation; idempotent run ids; run state survives a trainer restart."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml

from chatrl.clients.lib import TrainerClient
from chatrl.services.proto.chatrl.v1 import trainer_pb2
from chatrl.services.runtime.server import ServerConfig
from chatrl.services.trainer.runs import RunManager
from chatrl.services.trainer.server import TrainerConfig, build

MICRO = Path(__file__).parents[1] / "configs" / "micro.yaml"


def micro_yaml(tiny_data, gold=None, **extra) -> str:
    d = yaml.safe_load(MICRO.read_text())
    d.pop("run_dir")  # the trainer gives each run its own output directory
    d["data"] = {"pretrain_files": [str(tiny_data["corpus"])], "sft_file": str(tiny_data["sft"]),
                 "prompts_file": str(tiny_data["prompts"]), "eval_prompts_file": str(tiny_data["eval_prompts"]),
                 "rankings_file": str(tiny_data["rankings"])}
    if gold is not None:
        d["data"]["gold_file"] = str(gold)
    d.update(extra)
    return yaml.safe_dump(d)


@pytest.fixture()
def trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATRL_TEST_TOKEN", "tok")
    srv, svc = build(ServerConfig(port=0, auth_token_env="CHATRL_TEST_TOKEN"),
                     TrainerConfig(runs_dir=str(tmp_path / "runs"), threads=1))
    yield srv, svc
    srv.stop(0)
    svc.close()


def test_pipeline_run_streams_progress_and_lists_checkpoints(trainer, tiny_data, tiny_gold, ray_session):
    """StartRun(PIPELINE) drives the whole loop: stages, services, Ray rollouts, PPO."""
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
