"""trainer service — the control plane: ``StartRun`` (a stage or the whole pipeline, from a config)
runs in the background; ``GetRun``/``ListRuns``, ``WatchRun`` (server stream of progress, metrics, logs,
checkpoints and state changes), ``CancelRun``, ``ListCheckpoints``. Run management lives in
``runs.py`` (no gRPC); the stages in ``stages/``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from chatrl.services.core.checkpoint import list_checkpoints
from chatrl.services.core.config import RunConfig
from chatrl.services.proto.chatrl.v1 import trainer_pb2, trainer_pb2_grpc
from chatrl.services.proto.enums import RUN_STATE, STAGE, UnknownEnumError
from chatrl.services.runtime.errors import ServiceError, already_exists, invalid, not_found
from chatrl.services.runtime.main import run_service
from chatrl.services.runtime.server import ServerConfig, ServiceServer
from chatrl.services.trainer.runs import Event, RunError, RunManager, RunRecord, run_endpoints
from chatrl.services.trainer.stages.common import Reporter


@dataclass
class TrainerConfig:
    runs_dir: str = "runs/trainer"  # run records, events and (by default) each run's output
    threads: int = 2  # torch threads for training
    # a run started here is confined: it writes only inside runs_dir (never in another run's directory)
    # and reads only there or under these roots (data files, tokenizer, models, checkpoints, the services
    # config); the chatrl CLI, a local user's own process, is not confined
    data_roots: list[str] = field(default_factory=lambda: [".cache/chatrl", "configs"])
    # hosts a run config may name for the services it dials (pipeline.replica_hosts); loopback always
    dial_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])


def run_stage(stage: str, cfg: RunConfig, reporter: Reporter) -> None:
    """Execute one stage, or the pipeline, with the same code `chatrl train` / `chatrl pipeline` use. PPO and
    the pipeline talk to the services; with ``pipeline.start_services`` this trainer launches them for the
    run (free loopback ports, logs in the run's ``logs/``) and stops them when it ends."""
    from chatrl.services.trainer.stages import STAGES
    from chatrl.services.trainer.stages.common import setup_runtime

    setup_runtime(cfg)
    if stage in ("ppo", "pipeline"):
        from chatrl.services.trainer.pipeline import run_pipeline, run_ppo_stage

        with run_endpoints(cfg, reporter) as endpoints:
            (run_pipeline if stage == "pipeline" else run_ppo_stage)(cfg, reporter, endpoints)
        return
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not available in this trainer")
    STAGES[stage](cfg, reporter)


def _ts(t: float) -> Timestamp | None:
    if not t:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _state(s: str) -> int:
    return RUN_STATE.value(s)  # "" → RUN_STATE_UNSPECIFIED


def _stage(s: str) -> int:
    """'sft', 'reward_r1' / 'ppo_r0' (a stage of one pipeline round) → their proto stage; anything else
    (e.g. the ``policy`` pointer directory) → STAGE_UNSPECIFIED."""
    try:
        return STAGE.value(re.sub(r"_r\d+$", "", s))
    except UnknownEnumError:
        return trainer_pb2.STAGE_UNSPECIFIED


def run_proto(r: RunRecord) -> trainer_pb2.Run:
    return trainer_pb2.Run(
        run_id=r.run_id, state=_state(r.state), stage=_stage(r.stage),
        progress=trainer_pb2.Progress(stage=_stage(r.current_stage), round=r.round, step=r.step,
                                      total_steps=r.total_steps),
        error_message=r.error, created_at=_ts(r.created_at), started_at=_ts(r.started_at),
        finished_at=_ts(r.finished_at), latest_metrics=r.metrics, config_yaml=r.config_yaml,
        output_dir=r.output_dir)


def event_proto(run_id: str, e: Event) -> trainer_pb2.RunEvent:
    ev = trainer_pb2.RunEvent(run_id=run_id, sequence=e.seq, time=_ts(e.time), state=_state(e.state),
                              progress=trainer_pb2.Progress(stage=_stage(e.stage), round=e.round, step=e.step,
                                                            total_steps=e.total))
    if e.kind == "metrics":
        ev.metrics.values.update(e.metrics)
    elif e.kind == "state":
        ev.state_change.CopyFrom(trainer_pb2.StateChange(previous_state=_state(e.prev_state),
                                                         new_state=_state(e.state), error_message=e.text))
    elif e.kind == "checkpoint":
        ev.checkpoint.CopyFrom(trainer_pb2.Checkpoint(run_id=run_id, **e.checkpoint))
    else:
        ev.log_line = e.text
    return ev


def _err(e: RunError) -> ServiceError:
    msg = str(e)
    if e.kind == "invalid":
        field, _, why = msg.partition(": ")
        return invalid(field, why)
    return already_exists(msg) if e.kind == "exists" else not_found(msg)


class ServiceHealthCollector:
    """The services a run launched itself (``pipeline.start_services``), read at scrape time:
    ``chatrl_trainer_service_restarts_total{run_id, service}`` — times the launcher restarted a service
    that died (as a Kubernetes Deployment would; in a cluster, kube-state-metrics counts those) — and
    ``chatrl_trainer_run_degraded{run_id}`` — 1 once a service of the run has died (restarted since, or
    still down), else 0. Which RL iterations had to heal the services shows in the run's ``degraded``
    metric (``chatrl_trainer_metric``)."""

    def __init__(self, mgr: RunManager) -> None:
        self.mgr = mgr

    def collect(self):
        restarts = CounterMetricFamily("chatrl_trainer_service_restarts", "times a service a run launched was "
                                       "restarted after it died", labels=["run_id", "service"])
        degraded = GaugeMetricFamily("chatrl_trainer_run_degraded", "1 once a service the run launched has "
                                     "died (restarted or still down)", labels=["run_id"])
        for run_id, (counts, down) in self.mgr.service_health().items():
            for service, n in sorted(counts.items()):
                restarts.add_metric([run_id, service], n)
            degraded.add_metric([run_id], float(any(counts.values()) or bool(down)))
        yield restarts
        yield degraded


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, cfg: TrainerConfig, registry) -> None:
        self.cfg = cfg
        self.mgr = RunManager(Path(cfg.runs_dir), run_stage, confined=(list(cfg.data_roots), list(cfg.dial_hosts)))
        self.g_metric = Gauge("chatrl_trainer_metric", "latest training metric of a run", ["run_id", "stage", "name"],
                              registry=registry)
        self.g_runs = Gauge("chatrl_trainer_runs", "runs by state", ["state"], registry=registry)
        for st in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"):
            self.g_runs.labels(st).set_function(lambda st=st: sum(r.state == st for r in self.mgr.list()))
        registry.register(ServiceHealthCollector(self.mgr))
        Gauge("chatrl_trainer_awaiting_rankings", "comparison tasks this trainer's runs wait for people to rank "
              "(pipeline.labelers 0)", registry=registry).set_function(self.mgr.awaiting_rankings)
        self.mgr.on_metrics = lambda run, stage, values: [
            self.g_metric.labels(run.run_id, stage, k).set(float(v)) for k, v in values.items()]

    def _call(self, fn, *a):
        try:
            return fn(*a)
        except RunError as e:
            raise _err(e) from None

    def StartRun(self, request, context):
        try:
            stage = STAGE.name(request.stage)
        except UnknownEnumError:
            stage = ""
        if not stage:
            raise invalid("stage", "must be one of PRETRAIN, SFT, REWARD_MODEL, PPO, PIPELINE")
        rec = self._call(self.mgr.start, stage, request.config_yaml,
                         dict(request.overrides), request.run_id, request.request_id)
        return trainer_pb2.StartRunResponse(run=run_proto(rec))

    def GetRun(self, request, context):
        return trainer_pb2.GetRunResponse(run=run_proto(self._call(self.mgr.get, request.run_id)))

    def ListRuns(self, request, context):
        states = {trainer_pb2.RunState.Name(s).removeprefix("RUN_STATE_") for s in request.states}
        runs = [r for r in reversed(self.mgr.list()) if not states or r.state in states]  # newest first
        size = request.page_size or 100
        if size < 0:
            raise invalid("page_size", "must be >= 0")
        try:
            start = int(request.page_token or 0)
        except ValueError:
            raise invalid("page_token", "not a token from a previous ListRuns") from None
        page = runs[start: start + size]
        nxt = str(start + size) if start + size < len(runs) else ""
        return trainer_pb2.ListRunsResponse(runs=[run_proto(r) for r in page], next_page_token=nxt)

    def WatchRun(self, request, context):
        self._call(self.mgr.get, request.run_id)
        after = request.after_sequence
        while context.is_active():
            evs, over = self.mgr.events_after(request.run_id, after, timeout=1.0)
            for e in evs:
                after = e.seq
                if e.kind == "log" and not request.include_logs:
                    continue
                yield trainer_pb2.WatchRunResponse(event=event_proto(request.run_id, e))
            if over and not evs:
                return
            if over:
                evs2, _ = self.mgr.events_after(request.run_id, after, timeout=0)
                if not evs2:
                    return

    def CancelRun(self, request, context):
        return trainer_pb2.CancelRunResponse(run=run_proto(self._call(self.mgr.cancel, request.run_id,
                                                                      request.reason)))

    def ListCheckpoints(self, request, context):
        rec = self._call(self.mgr.get, request.run_id)
        try:
            want = STAGE.name(request.stage)
        except UnknownEnumError:
            raise invalid("stage", "not a Stage value") from None
        out = []
        root = Path(rec.output_dir) / "checkpoints"
        if root.exists():
            for sd in sorted(root.iterdir()):
                if not sd.is_dir() or (want and want != "pipeline" and _stage(sd.name) != request.stage):
                    continue
                for ck in list_checkpoints(sd):
                    m = ck.manifest
                    size = sum(f.stat().st_size for f in ck.path.iterdir() if f.is_file())
                    metrics = {k: float(v) for k, v in (m.get("meta", {}).get("metrics") or {}).items()
                               if isinstance(v, (int, float))}
                    out.append(trainer_pb2.Checkpoint(
                        run_id=rec.run_id, stage=_stage(m["stage"]) or _stage(sd.name),
                        round=int(m.get("meta", {}).get("round", 0)), step=ck.step, path=str(ck.path),
                        sha256=ck.sha256, size_bytes=size, created_at=_ts(m.get("created", 0)), metrics=metrics))
        return trainer_pb2.ListCheckpointsResponse(checkpoints=out)

    def close(self) -> None:
        self.mgr.close()


def build(server_cfg: ServerConfig, cfg: TrainerConfig) -> tuple[ServiceServer, TrainerServicer]:
    torch.set_num_threads(max(1, cfg.threads))
    srv = ServiceServer("trainer", server_cfg)
    svc = TrainerServicer(cfg, srv.registry)
    srv.add_service(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, svc,
                    trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name)
    srv.start()
    srv.set_serving(True)
    return srv, svc


def main(argv: list[str] | None = None) -> int:
    return run_service("trainer", TrainerConfig, build, argv)
