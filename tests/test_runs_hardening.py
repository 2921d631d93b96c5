"""Run management under faults and hostile input (issue 11, items 7, 8 and 12), on the RunManager with a
stand-in runner (no training) and through the trainer's gRPC API:

- a torn last line of events.jsonl is cut off on restart, and sequence numbers stay strictly increasing;
- StartRun is idempotent by request_id; a cancel that reaches a PENDING run is final;
- a service-started run's paths stay inside the runs directory and the data roots, and its service
  overrides cannot touch credentials, hosts or TLS — INVALID_ARGUMENT naming the field, nothing written."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
from kit import rpc_error, wait_for

from chatrl.clients.lib import TrainerClient
from chatrl.services.runtime.server import ServerConfig
from chatrl.services.trainer.runs import RunError, RunManager
from chatrl.services.trainer.server import TrainerConfig, build


def quick(stage, cfg, rep):
    rep.log("ran")


class Gate:
    """A runner that blocks until released, recording the stages it was called with."""

    def __init__(self) -> None:
        self.release, self.started, self.calls = threading.Event(), threading.Event(), []

    def __call__(self, stage, cfg, rep):
        self.calls.append(cfg.run_dir)
        self.started.set()
        self.release.wait(30)


def seqs(mgr: RunManager, run_id: str) -> list[int]:
    return [e.seq for e in mgr.events[run_id]]


# --- 8. torn event log --------------------------------------------------------------------------------
def test_a_torn_last_line_is_cut_off_and_sequences_keep_increasing(tmp_path):
    m = RunManager(tmp_path, quick)
    m.start("sft", "", {}, run_id="r")
    wait_for(lambda: m.get("r").state == "SUCCEEDED")
    m.close()
    f = tmp_path / "r" / "events.jsonl"
    whole = f.read_bytes()
    last_seq = json.loads(whole.splitlines()[-1])["seq"]  # queued, RUNNING, "ran", SUCCEEDED: 4
    assert last_seq == 4
    f.write_bytes(whole + b'{"seq": 5, "time": 1.0, "kind": "log", "sta')  # the process died mid-write

    m = RunManager(tmp_path, quick)  # restart: the fragment is gone from the file
    assert f.read_bytes() == whole and seqs(m, "r") == [1, 2, 3, 4]
    ev = m._emit(m.get("r"), "log", text="after the restart")
    # 5 may have reached a watcher before the crash: the next event skips it; the line stands alone
    assert ev.seq == 6
    assert json.loads(f.read_bytes().splitlines()[-1])["text"] == "after the restart"
    m.close()

    m = RunManager(tmp_path, quick)  # and again: every event readable, strictly increasing
    assert seqs(m, "r") == [1, 2, 3, 4, 6]
    assert m._emit(m.get("r"), "log", text="again").seq == 7
    m.close()


def test_a_whole_last_event_without_its_newline_is_kept(tmp_path):
    m = RunManager(tmp_path, quick)
    m.start("sft", "", {}, run_id="r")
    wait_for(lambda: m.get("r").state == "SUCCEEDED")
    m.close()
    f = tmp_path / "r" / "events.jsonl"
    f.write_bytes(f.read_bytes().rstrip(b"\n"))  # died between the JSON and its newline
    m = RunManager(tmp_path, quick)
    assert seqs(m, "r") == [1, 2, 3, 4]
    assert m._emit(m.get("r"), "log", text="next").seq == 5
    assert [json.loads(x)["seq"] for x in f.read_bytes().splitlines()] == [1, 2, 3, 4, 5]
    m.close()


# --- 12. retries that duplicate; cancellation is final -------------------------------------------------
def test_start_run_with_the_same_request_id_starts_one_run(tmp_path):
    m = RunManager(tmp_path, quick)
    a = m.start("sft", "", {}, request_id="req-1")
    b = m.start("sft", "", {}, request_id="req-1")  # the client's retry after a lost answer
    c = m.start("sft", "", {}, request_id="req-2")
    assert a.run_id == b.run_id != c.run_id and len(m.list()) == 2
    m.close()
    m = RunManager(tmp_path, quick)  # the key survives a trainer restart
    assert m.start("sft", "", {}, request_id="req-1").run_id == a.run_id and len(m.list()) == 2
    m.close()


def test_a_queued_run_cancelled_before_the_worker_reaches_it_never_runs(tmp_path):
    gate = Gate()
    m = RunManager(tmp_path, gate)
    m.start("sft", "", {}, run_id="busy")
    gate.started.wait(30)  # the worker is busy: "queued" waits in the queue
    m.start("sft", "", {}, run_id="queued")
    assert m.cancel("queued").state == "CANCELLED"
    gate.release.set()
    wait_for(lambda: m.get("busy").state == "SUCCEEDED")
    m.start("sft", "", {}, run_id="after")  # the worker has passed "queued" once this one is done
    wait_for(lambda: m.get("after").state == "SUCCEEDED")
    assert m.get("queued").state == "CANCELLED" and len(gate.calls) == 2
    m.close()


class CancelWhileClaiming(RunManager):
    """Delivers a CancelRun at the worst moment: after the worker took the run off the queue, before the
    stage starts (the config is parsed in between)."""

    def parse_config(self, config_yaml, overrides, run_id):
        cfg = super().parse_config(config_yaml, overrides, run_id)
        if threading.current_thread() is self._worker:
            self.cancel(run_id, "changed my mind")
        return cfg


def test_a_cancel_that_races_the_worker_is_final(tmp_path):
    calls = []
    m = CancelWhileClaiming(tmp_path, lambda stage, cfg, rep: calls.append(stage))
    m.start("sft", "", {}, run_id="r")
    wait_for(lambda: m.get("r").state in ("SUCCEEDED", "FAILED", "CANCELLED"))
    assert m.get("r").state == "CANCELLED" and calls == []  # the stage never ran
    m.close()


# --- 7. run configs stay inside the sandbox -------------------------------------------------------------
@pytest.fixture()
def confined(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    roots = [str(data), "configs", ".cache/chatrl"]  # the trainer's defaults plus a data directory
    m = RunManager(tmp_path / "runs", quick, confined=(roots, ["127.0.0.1", "policy-inference-pods"]))
    yield m, tmp_path
    m.close()


@pytest.mark.parametrize("key, value, field", [
    ("run_dir", "{tmp}/elsewhere", "run_dir"),
    ("run_dir", "{tmp}/runs/../elsewhere", "run_dir"),
    ("run_dir", "{tmp}/runs/victim/output", "run_dir"),  # another run's directory
    ("data.prompts_file", "/proc/self/environ", "data.prompts_file"),
    ("data.pretrain_files", "['/etc/passwd']", "data.pretrain_files[0]"),
    ("data.cache_dir", "/tmp/anywhere", "data.cache_dir"),
    ("tokenizer.path", "/etc/hostname", "tokenizer.path"),
    ("model.path", "/root", "model.path"),
    ("ppo.policy_init", "/other/ckpt", "ppo.policy_init"),
    ("ppo.reward_model", "/other/rm", "ppo.reward_model"),
    ("pipeline.reuse_from", "/other/run", "pipeline.reuse_from"),
    ("pipeline.services", "/other/services.yaml", "pipeline.services"),
    ("pipeline.service_overrides", "['policy.auth_token_env=']", "pipeline.service_overrides[0]"),
    ("pipeline.service_overrides", "['policy.host=127.0.0.1', 'reward.host=evil.example']",
     "pipeline.service_overrides[1]"),
    ("pipeline.services", "{tmp}/runs/victim/services.yaml", "pipeline.services"),  # runs write there
    ("pipeline.service_overrides", "['policy.tls_cert=/x.pem']", "pipeline.service_overrides[0]"),
    ("pipeline.service_overrides", "['feedback.db=/x.db']", "pipeline.service_overrides[0]"),
    ("pipeline.service_overrides", "['policy.allow_insecure=true']", "pipeline.service_overrides[0]"),
    ("pipeline.replica_hosts", "{{policy: evil.example}}", "pipeline.replica_hosts.policy"),
])
def test_a_path_or_override_outside_the_sandbox_is_refused_and_nothing_written(confined, key, value, field):
    m, tmp = confined
    m.start("sft", "", {}, run_id="victim")
    wait_for(lambda: m.get("victim").state == "SUCCEEDED")
    before = sorted(p.name for p in (tmp / "runs").iterdir())
    with pytest.raises(RunError) as e:
        m.start("pipeline", "", {key: value.format(tmp=tmp)})
    assert e.value.kind == "invalid" and str(e.value).startswith(field + ": ")
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == before and len(m.list()) == 1


def test_paths_inside_the_sandbox_are_accepted(confined):
    m, tmp = confined
    rec = m.start("sft", "", {"data.prompts_file": str(tmp / "data" / "prompts.jsonl"),
                              "data.cache_dir": str(tmp / "data" / "cache"),
                              "run_dir": str(tmp / "runs" / "shared"),
                              "pipeline.services": str(tmp / "data" / "services.yaml"),
                              "pipeline.service_overrides": "['policy.max_batch_size=8', 'policy.host=127.0.0.1']",
                              "pipeline.replica_hosts": "{policy: policy-inference-pods}"})
    wait_for(lambda: m.get(rec.run_id).state == "SUCCEEDED")


def test_the_service_answers_invalid_argument_naming_the_field(tmp_path):
    data = tmp_path / "data"  # the run's data files need not exist: it only has to be accepted
    srv, svc = build(ServerConfig(port=0, auth_token_env=""), TrainerConfig(
        runs_dir=str(tmp_path / "runs"), threads=1, data_roots=[str(data), "configs"]))
    ok = {f"data.{k}": str(data / k) for k in ("sft_file", "prompts_file", "eval_prompts_file", "cache_dir")}
    ok["data.pretrain_files"] = f"['{data / 'corpus.txt'}']"
    try:
        with TrainerClient(srv.address, token="") as c:
            code, msg = rpc_error(c.start_run, "sft", "data:\n  sft_file: /proc/self/environ\n")
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "data.sft_file" in msg
            assert c.list_runs() == [] and list(Path(tmp_path / "runs").iterdir()) == []
            # a retry with the request id of the first attempt returns the same run
            a = c.start_run("sft", "", ok, request_id="once")
            assert c.start_run("sft", "", ok, request_id="once").run_id == a.run_id
            assert len(c.list_runs()) == 1
    finally:
        srv.stop(0)
        svc.close()
