"""Run management for the trainer service, with no gRPC in it.

A run is a stage (or the whole pipeline) executed from a config in a background worker. Its record
(state, progress, latest metrics, error) is persisted atomically as ``<runs_dir>/<run_id>/run.json`` on
every state change and periodically, and its events are appended to ``events.jsonl`` — so run state
survives a trainer restart. Runs that were RUNNING or PENDING when the trainer died are queued again on
start-up and resume from their checkpoints (every stage resumes where it stopped). A torn last line of
``events.jsonl`` (the process died mid-write; the log is not fsynced) is cut off on load, and sequence
numbers stay strictly increasing across restarts, so ``WatchRun`` never sees a number twice.

A run started through the service is *confined* (:func:`confine`): every path its config names stays inside
the trainer's runs directory or its configured data roots, and its service overrides cannot change
credentials, bind/dial hosts, TLS or file locations of the services it launches or dials. ``StartRun`` is
idempotent by ``request_id`` (a retried request returns the first run), and a cancel that reaches a
PENDING run is final: the worker claims a run and cancel decides under one lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from chatrl.services.core.checkpoint import atomic_write_text
from chatrl.services.core.config import RunConfig, config_from_yaml_text
from chatrl.services.trainer.rollout import Endpoints
from chatrl.services.trainer.stages.common import Cancelled, Reporter, run_dir

log = logging.getLogger("chatrl.trainer")

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STAGES = ("pretrain", "sft", "reward", "ppo", "pipeline")


@dataclass
class RunRecord:
    run_id: str
    stage: str
    config_yaml: str
    overrides: dict[str, str]
    output_dir: str
    state: str = "PENDING"
    current_stage: str = ""
    round: int = 0
    step: int = 0
    total_steps: int = 0
    error: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    restarts: int = 0
    request_id: str = ""  # the client's idempotency key of the StartRun that created it
    last_seq: int = 0  # the newest event sequence when the record was saved (a floor after a torn log)


@dataclass
class Event:
    seq: int
    time: float
    kind: str  # metrics | log | state | checkpoint
    state: str
    stage: str
    round: int
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    text: str = ""
    prev_state: str = ""
    checkpoint: dict = field(default_factory=dict)


class RunError(Exception):
    def __init__(self, kind: str, msg: str) -> None:  # kind: invalid | not_found | exists
        super().__init__(msg)
        self.kind = kind


StageRunner = Callable[[str, RunConfig, Reporter], None]

PIPELINE_SERVICES = ("policy", "reward", "reference", "feedback")


@contextlib.contextmanager
def run_endpoints(cfg: RunConfig, reporter: Reporter) -> Iterator[Endpoints]:
    """The services of a pipeline or PPO run, as the run config says: with ``pipeline.start_services``
    launched as local processes (no models; the run seeds them) and stopped when the block ends; without,
    the addresses of running ones from ``pipeline.services`` + ``pipeline.service_overrides``. The token
    is the one the services' ``auth_token_env`` names, from this process's environment. Launched for a run
    of the trainer service, the cluster is kept in its :attr:`RunManager.clusters` (the restart counter and
    the "run degraded" gauge read it)."""
    from chatrl.services.runtime.config import load_services_config

    pc = cfg.pipeline
    secs = load_services_config(pc.services if pc.services and os.path.exists(pc.services) else None,
                                list(pc.service_overrides))
    from chatrl.services.runtime import roles

    token = roles.load_credential(secs["policy"].get("auth_token_env", "CHATRL_AUTH_TOKEN"),
                                  secs["policy"].get("auth_token_file", ""), "operator")
    cluster = None
    if pc.start_services:
        from chatrl.services.runtime.launcher import launch_pipeline_services

        t0 = time.perf_counter()
        reporter.log(f"starting services {list(PIPELINE_SERVICES)} …")
        cluster = launch_pipeline_services(pc.services, list(pc.service_overrides), run_dir(cfg), cfg.device)
        if isinstance(reporter, _RunReporter):  # the trainer service exports its restarts (RunManager.clusters)
            reporter.mgr.clusters[reporter.run.run_id] = cluster
        addrs = {n: cluster.address(n) for n in PIPELINE_SERVICES}
        reporter.log(f"services up in {time.perf_counter() - t0:.1f}s: "
                     + ", ".join(f"{n} {a}" for n, a in addrs.items()))
    else:
        addrs = {n: f"{secs[n].get('host', '127.0.0.1')}:{secs[n]['port']}" for n in PIPELINE_SERVICES}
    try:
        yield Endpoints(addrs["policy"], addrs["reward"], addrs["reference"], token=token or None,
                        feedback=addrs["feedback"], replica_hosts=dict(pc.replica_hosts))
    finally:
        if cluster is not None:
            cluster.stop()


# --- confinement of service-started runs ----------------------------------------------------------------
# Config fields naming files or directories a run reads (anything under the runs directory or a data root).
READ_PATHS = ("data.sft_file", "data.prompts_file", "data.eval_prompts_file", "data.rankings_file",
              "data.pairs_file", "data.gold_file", "tokenizer.path", "model.path", "ppo.policy_init",
              "ppo.reward_model", "dpo.reference", "pipeline.reuse_from", "pipeline.services")
# Service settings a run may not override: credentials, what is bound or dialled, TLS, files of the services.
_FORBIDDEN_KEY = re.compile(r"(^|_)(token|auth|tls|host|hosts|insecure|address|db|checkpoint|file|dir|path|ca|"
                            r"cert|key)(_|$)")


def _inside(p: Path, roots: list[Path]) -> bool:
    return any(p == r or r in p.parents for r in roots)


def confine(cfg: RunConfig, runs_dir: Path, run_id: str, data_roots: list[str], dial_hosts: list[str],
            other_runs: list[str]) -> None:
    """Refuse (RunError invalid, naming the field) a service-started run whose config reaches outside the
    trainer's sandbox: ``run_dir`` (written) must be inside ``runs_dir`` and not inside another run's own
    directory; every path read (:data:`READ_PATHS`, ``data.pretrain_files``) and ``data.cache_dir`` (built
    there on first use) inside ``runs_dir`` or a data root; ``pipeline.service_overrides`` must not touch
    credentials, TLS or files, and may set a ``host`` only to one of ``dial_hosts``, as must
    ``pipeline.replica_hosts``; ``pipeline.services`` (hosts and credentials) must be in a data root.
    Paths are resolved first (``..`` and symlinks cannot step out)."""
    runs = runs_dir.resolve()
    readable = [runs] + [Path(r).resolve() for r in data_roots]

    def get(dotted: str):
        v = cfg
        for part in dotted.split("."):
            v = getattr(v, part)
        return v

    rd = Path(cfg.run_dir).resolve()
    if not _inside(rd, [runs]) or rd == runs:
        raise RunError("invalid", f"run_dir: must be inside the trainer's runs directory {runs}")
    for other in other_runs:
        if other != run_id and _inside(rd, [runs / other]):
            raise RunError("invalid", f"run_dir: inside run {other}'s directory")
    if cfg.pipeline.services and not _inside(Path(cfg.pipeline.services).resolve(), readable[1:]):
        raise RunError("invalid", "pipeline.services: must be inside a data root (it names the services' "
                                  "hosts and credentials)")
    fields = [(f, get(f)) for f in READ_PATHS] + [("data.cache_dir", cfg.data.cache_dir)]
    fields += [(f"data.pretrain_files[{i}]", p) for i, p in enumerate(cfg.data.pretrain_files)]
    for name, value in fields:
        if value and not _inside(Path(value).resolve(), readable):
            raise RunError("invalid", f"{name}: must be inside the runs directory or a data root "
                                      f"({', '.join(map(str, readable))})")
    for i, ov in enumerate(cfg.pipeline.service_overrides):
        key, _, value = (x.strip() for x in str(ov).partition("="))
        if key.rpartition(".")[2] == "host" and value.strip("'\"") in dial_hosts:
            continue  # where a service is (or binds): one of the operator's hosts
        if _FORBIDDEN_KEY.search(key.rpartition(".")[2]):
            raise RunError("invalid", f"pipeline.service_overrides[{i}]: {key[:80]} may not be set by a run "
                                      "(credentials, hosts, TLS and files of the services are the operator's)")
    for svc, host in cfg.pipeline.replica_hosts.items():
        if host not in dial_hosts:
            raise RunError("invalid", f"pipeline.replica_hosts.{svc[:40]}: {str(host)[:80]} is not one of the "
                                      f"trainer's dial_hosts")


class _RunReporter(Reporter):
    """Turns a stage's progress into run events (and keeps the record current)."""

    def __init__(self, mgr: RunManager, run: RunRecord) -> None:
        super().__init__(quiet=True)
        self.mgr, self.run = mgr, run
        self._last_save = 0.0

    def start(self, stage: str, total: int, initial: int = 0) -> None:
        self.run.current_stage, self.run.total_steps, self.run.step = stage, total, initial
        m = re.search(r"_r(\d+)$", stage)
        self.run.round = int(m.group(1)) if m else self.run.round
        self.mgr._emit(self.run, "log", text=f"stage {stage} started ({total} steps)")

    def progress(self, stage: str, step: int, total: int) -> None:
        self.run.current_stage, self.run.step, self.run.total_steps = stage, step, total
        if time.time() - self._last_save > 2.0:
            self._last_save = time.time()
            self.mgr._save(self.run)

    def metrics(self, stage: str, step: int, total: int, values: dict[str, float]) -> None:
        super().metrics(stage, step, total, values)
        self.run.metrics.update({f"{stage}/{k}": float(v) for k, v in values.items()})
        self.mgr._emit(self.run, "metrics", metrics={k: float(v) for k, v in values.items()})
        self.mgr.on_metrics(self.run, stage, values)

    def log(self, msg: str) -> None:
        self.mgr._emit(self.run, "log", text=msg)

    def awaiting_rankings(self, tasks: int) -> None:
        self.mgr.set_awaiting(self.run.run_id, tasks)

    def checkpoint(self, info: dict) -> None:
        self.mgr._emit(self.run, "checkpoint", checkpoint=info)


class RunManager:
    """Runs of one trainer. ``confined`` (the service): :func:`confine` checks every run's config against
    ``data_roots`` and ``dial_hosts``; None (a local user's own process) trusts the config."""

    def __init__(self, runs_dir: Path, runner: StageRunner, max_events: int = 10000,
                 confined: tuple[list[str], list[str]] | None = None) -> None:
        self.dir = Path(runs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runner = runner
        self.max_events = max_events
        self.confined = confined  # (data_roots, dial_hosts)
        self._seq: dict[str, int] = {}  # run id → the last sequence number given out
        self._lock = threading.RLock()  # RLock: state changes emit events under the same lock
        self._cv = threading.Condition(self._lock)
        self.runs: dict[str, RunRecord] = {}
        self.events: dict[str, list[Event]] = {}
        self.reporters: dict[str, _RunReporter] = {}
        self.awaiting: dict[str, int] = {}  # run id → comparison tasks it waits for people to rank
        self._q: queue.Queue[str | None] = queue.Queue()
        self._closing = False
        self.on_metrics: Callable[[RunRecord, str, dict], None] = lambda run, stage, values: None
        # run id → the LocalCluster run_endpoints launched for it (kept after the run: its restart counts)
        self.clusters: dict[str, object] = {}
        self._load()
        self._worker = threading.Thread(target=self._work, name="trainer-runs", daemon=True)
        self._worker.start()

    # --- persistence ------------------------------------------------------------------------------
    def _load(self) -> None:
        for f in sorted(self.dir.glob("*/run.json")):
            try:
                rec = RunRecord(**json.loads(f.read_text()))
            except (json.JSONDecodeError, TypeError) as e:
                log.warning("skipping unreadable run record %s: %s", f, e)
                continue
            self.runs[rec.run_id] = rec
            self.events[rec.run_id] = self._read_events(rec)
        for rec in sorted(self.runs.values(), key=lambda r: r.created_at):
            if rec.state in ("RUNNING", "PENDING"):
                rec.restarts += 1
                prev = rec.state
                rec.state = "PENDING"
                self._emit(rec, "state", prev_state=prev, text="trainer restarted; the run resumes from its "
                                                                "checkpoints")
                self._q.put(rec.run_id)

    def _read_events(self, rec: RunRecord) -> list[Event]:
        """The run's logged events. A torn last line (the process died mid-write) is cut off the file, so
        the next event starts on a line of its own; an unreadable line inside the file (from before that
        fix) is skipped, and so is an event whose sequence does not increase. The next sequence number is
        above every one seen, on disk or in the record, plus one for the torn event (a watcher may have
        received it before the crash)."""
        f = self.dir / rec.run_id / "events.jsonl"
        out: list[Event] = []
        last, torn = rec.last_seq, False
        if f.exists():
            data = f.read_bytes()
            body, _, tail = data.rpartition(b"\n")  # tail: what follows the last newline (b"" if whole)
            for line in body.split(b"\n") if body else []:
                ev = self._parse_event(line)
                if ev is None:
                    if line.strip():  # a line glued to a torn fragment by an older trainer
                        log.warning("run %s: skipping an unreadable line in %s", rec.run_id, f)
                elif ev.seq > (out[-1].seq if out else 0):
                    out.append(ev)
            if tail:  # the process died before the newline: cut the fragment off, keep a whole event
                ev = self._parse_event(tail)
                with open(f, "r+b") as fh:
                    fh.truncate(len(data) - len(tail))
                    if ev is not None:
                        fh.seek(0, os.SEEK_END)
                        fh.write(tail + b"\n")
                if ev is None:
                    torn = True
                    log.warning("run %s: cut a torn last line off %s", rec.run_id, f)
                elif ev.seq > (out[-1].seq if out else 0):
                    out.append(ev)
        last = max(last, out[-1].seq if out else 0)
        self._seq[rec.run_id] = last + 1 if torn else last
        return out[-self.max_events:]

    @staticmethod
    def _parse_event(line: bytes) -> Event | None:
        try:
            return Event(**json.loads(line))
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
            return None

    def _save(self, rec: RunRecord) -> None:
        rec.last_seq = self._seq.get(rec.run_id, rec.last_seq)
        atomic_write_text(self.dir / rec.run_id / "run.json", json.dumps(asdict(rec)))

    def _emit(self, rec: RunRecord, kind: str, **kw) -> Event:
        with self._cv:
            evs = self.events.setdefault(rec.run_id, [])
            seq = max(self._seq.get(rec.run_id, 0), evs[-1].seq if evs else 0) + 1
            self._seq[rec.run_id] = seq
            ev = Event(seq=seq, time=time.time(), kind=kind, state=rec.state, stage=rec.current_stage or rec.stage,
                       round=rec.round, step=rec.step, total=rec.total_steps, **kw)
            evs.append(ev)
            if len(evs) > self.max_events:
                del evs[: len(evs) - self.max_events]
            d = self.dir / rec.run_id
            d.mkdir(parents=True, exist_ok=True)
            with open(d / "events.jsonl", "a") as f:
                f.write(json.dumps(asdict(ev)) + "\n")
            if kind == "state" or kind == "metrics":
                self._save(rec)
            self._cv.notify_all()
        return ev

    def _set_state(self, rec: RunRecord, state: str, error: str = "") -> None:
        prev = rec.state
        rec.state = state
        rec.error = error or rec.error
        if state == "RUNNING":
            rec.started_at = rec.started_at or time.time()
        if state in TERMINAL:
            rec.finished_at = time.time()
        self._emit(rec, "state", prev_state=prev, text=error)

    # --- API --------------------------------------------------------------------------------------
    def start(self, stage: str, config_yaml: str, overrides: dict[str, str], run_id: str = "",
              request_id: str = "") -> RunRecord:
        """Queue a run. A repeated ``request_id`` returns the run its first request started (a client's
        retry after a lost answer), whatever else it says; so does a repeated ``run_id`` with the same
        request. Nothing is written for a refused request."""
        if stage not in STAGES:
            raise RunError("invalid", f"stage: must be one of {list(STAGES)}, got {stage!r}")
        for name, v in (("run_id", run_id), ("request_id", request_id)):
            if v and (not all(c.isalnum() or c in "-_." for c in v) or len(v) > 64 or v.startswith(".")):
                raise RunError("invalid", f"{name}: letters, digits, '-', '_' and '.' only, at most 64")
        with self._lock:  # one start at a time: two attempts of one request must not both create a run
            if request_id:
                first = next((r for r in self.runs.values() if r.request_id == request_id), None)
                if first is not None:
                    return first
            old = self.runs.get(run_id) if run_id else None
            if old is not None:
                if (old.stage, old.config_yaml, old.overrides) == (stage, config_yaml, dict(overrides)):
                    return old  # an idempotent retry of the same StartRun
                raise RunError("exists", f"run_id: run {run_id} already exists with a different request")
            run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            cfg = self.parse_config(config_yaml, overrides, run_id)
            rec = RunRecord(run_id=run_id, stage=stage, config_yaml=config_yaml, overrides=dict(overrides),
                            output_dir=cfg.run_dir, request_id=request_id)
            self.runs[run_id] = rec
            self._emit(rec, "state", prev_state="", text="queued")
        self._q.put(run_id)
        return rec

    def parse_config(self, config_yaml: str, overrides: dict[str, str], run_id: str) -> RunConfig:
        from chatrl.services.core.config import ConfigError

        try:
            d = yaml.safe_load(config_yaml) if config_yaml.strip() else {}
        except yaml.YAMLError as e:
            raise RunError("invalid", f"config_yaml: invalid YAML: {e}") from None
        if not isinstance(d, dict):
            raise RunError("invalid", "config_yaml: top level must be a mapping")
        ov = [f"{k}={v}" for k, v in overrides.items()]
        if "run_dir" not in d and "run_dir" not in overrides:
            ov.append(f"run_dir={self.dir / run_id / 'output'}")
        try:
            cfg = config_from_yaml_text(yaml.safe_dump(d), ov)
        except (ConfigError, ValueError) as e:
            raise RunError("invalid", f"config_yaml: {e}") from None
        if self.confined is not None:
            confine(cfg, self.dir, run_id, *self.confined, other_runs=[r for r in self.runs if r != run_id])
        return cfg

    def get(self, run_id: str) -> RunRecord:
        with self._lock:
            rec = self.runs.get(run_id)
        if rec is None:
            raise RunError("not_found", f"run_id: no run {run_id!r}")
        return rec

    def list(self) -> list[RunRecord]:
        with self._lock:
            return sorted(self.runs.values(), key=lambda r: r.created_at)

    def cancel(self, run_id: str, reason: str = "") -> RunRecord:
        rec = self.get(run_id)
        with self._lock:  # the worker claims a PENDING run under this lock too: one of us decides
            if rec.state in TERMINAL:
                return rec
            rep = self.reporters.get(run_id)
            if rep is None:  # not claimed by the worker: final, the worker will skip it
                self._set_state(rec, "CANCELLED", reason or "cancelled before it started")
            else:
                rep.cancel_event.set()
                self._emit(rec, "log", text=f"cancel requested{': ' + reason if reason else ''}")
        return rec

    def set_awaiting(self, run_id: str, tasks: int) -> None:
        """Run ``run_id`` waits for people to rank ``tasks`` comparison tasks (0: it no longer waits)."""
        with self._lock:
            if tasks > 0:
                self.awaiting[run_id] = tasks
            else:
                self.awaiting.pop(run_id, None)

    def awaiting_rankings(self) -> int:
        """Comparison tasks this trainer's runs wait for people to rank (``pipeline.labelers: 0``), summed."""
        with self._lock:
            return sum(self.awaiting.values())

    def service_health(self) -> dict[str, tuple[dict[str, int], list[str]]]:
        """Per run that launched its own services: (restarts per service, services down right now)."""
        return {run_id: ({n: c.restarts.get(n, 0) for n in c.names}, c.down())
                for run_id, c in list(self.clusters.items())}

    def events_after(self, run_id: str, after: int, timeout: float) -> tuple[list[Event], bool]:
        """Events with seq > after (waiting up to timeout for new ones); and whether the run is over."""
        self.get(run_id)
        with self._cv:
            def ready():
                evs = self.events.get(run_id, [])
                return (evs and evs[-1].seq > after) or self.runs[run_id].state in TERMINAL

            self._cv.wait_for(ready, timeout=timeout)
            evs = [e for e in self.events.get(run_id, []) if e.seq > after]
            return evs, self.runs[run_id].state in TERMINAL

    # --- worker -----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            run_id = self._q.get()
            if run_id is None:
                return
            with self._lock:  # claim: PENDING → RUNNING with its reporter, atomically with respect to cancel
                rec = self.runs.get(run_id)
                if rec is None or rec.state != "PENDING":
                    continue
                rep = _RunReporter(self, rec)
                self.reporters[run_id] = rep
                self._set_state(rec, "RUNNING")
            try:
                cfg = self.parse_config(rec.config_yaml, rec.overrides, run_id)
                rep.check_cancelled()  # a cancel that came in while claiming: the runner never starts
                self.runner(rec.stage, cfg, rep)
                self._set_state(rec, "SUCCEEDED")
            except Cancelled:
                if self._closing:  # not the user's cancel: the trainer is stopping; resume on restart
                    self._set_state(rec, "PENDING", "trainer shut down; the run resumes when it restarts")
                else:
                    self._set_state(rec, "CANCELLED", "cancelled; checkpoints written so far are kept")
            except Exception as e:
                log.error("run %s failed:\n%s", run_id, traceback.format_exc())
                self._set_state(rec, "FAILED", f"{type(e).__name__}: {e}")
            finally:
                self.reporters.pop(run_id, None)
                self.set_awaiting(run_id, 0)

    def close(self) -> None:
        self._closing = True
        for rep in list(self.reporters.values()):
            rep.cancel_event.set()
        self._q.put(None)
        self._worker.join(timeout=30)
