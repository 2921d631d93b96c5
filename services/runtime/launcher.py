"""Local processes: every service as its own ``python -m chatrl.services.<name>`` process on loopback.

The one launcher behind ``chatrl up``, the pipeline command's ``start_services``, the benchmarks and the
tests. It starts processes and waits on the standard gRPC health check; it never talks a service's own API
(that is the caller's business, through the clients), so it imports no service and no client.

    with LocalCluster("configs/services.yaml", ["policy.port=6000"], only=["policy"]) as c:
        c.address("policy")   # '127.0.0.1:6000'
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatrl.services.runtime.config import SERVICES, load_services_config

UP = ("SERVING", "NOT_SERVING")  # answers health: the process is up (a model service may still be empty)
# How long services may take to come up. Generous: on a busy machine (CI, two CPU-bound jobs beside it)
# importing torch and binding takes tens of seconds; a slow start must not fail a run or a test.
START_TIMEOUT_ENV = "CHATRL_SERVICE_START_TIMEOUT"


def start_timeout(default: float = 600.0) -> float:
    """Seconds to wait for services to come up: ``$CHATRL_SERVICE_START_TIMEOUT`` or ``default``."""
    raw = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"${START_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports. Every socket stays bound until all are picked, so no port is
    handed out twice (closing each at once lets the kernel give the same port to the next bind)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def health(channel: grpc.Channel, timeout: float = 2.0) -> str:
    """'SERVING' / 'NOT_SERVING' from the standard health service, 'UNAVAILABLE' while it can't be reached."""
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as e:
        return "UNAVAILABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
            else e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


class LocalCluster:
    """Services as subprocesses from one service config (``services_yaml``; None or a missing file = the
    overrides alone). ``overrides`` are ``service.field=value`` (``policy.port=6000``); ``only`` limits the
    services started; each process logs to ``log_dir/<name>.log`` (appended) or nowhere; ``threads`` is
    each child's OMP/MKL thread count; ``env`` adds variables to the children's environment (a value of
    None removes one, e.g. ``{"CHATRL_AUTH_TOKEN": None}``)."""

    def __init__(self, services_yaml: str | None, overrides: list[str] | None = None,
                 only: list[str] | None = None, log_dir: Path | None = None, threads: int = 1,
                 env: dict[str, str | None] | None = None) -> None:
        self.yaml = str(services_yaml) if services_yaml and Path(services_yaml).exists() else None
        self.overrides = list(overrides or [])
        self.sections = load_services_config(self.yaml, self.overrides)
        unknown = sorted(set(only or ()) - set(SERVICES))
        if unknown:
            raise ValueError(f"unknown service {unknown[0]!r} (expected one of {', '.join(SERVICES)})")
        self.names = [s for s in SERVICES if not only or s in only]
        self.log_dir = Path(log_dir) if log_dir else None
        self.threads = threads
        self.env = dict(env or {})
        self.procs: dict[str, subprocess.Popen] = {}
        self._spawn: dict[str, tuple[list[str], dict[str, str]]] = {}  # name → (command, environment)
        self.restarts: dict[str, int] = {}  # name → times the supervisor restarted it
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def address(self, name: str) -> str:
        """Where to dial ``name``: its configured host and port, a wildcard bind dialled on loopback."""
        sec = self.sections[name]
        host = sec.get("host", "127.0.0.1")
        return f"{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{sec.get('port', 0)}"

    def log_path(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def start(self, timeout: float | None = None, wait_for: list[str] | None = None, serving: bool = True
              ) -> LocalCluster:
        """Start every service and wait until each of ``wait_for`` (default: all) is up: SERVING, or with
        ``serving=False`` answering health at all (a model service started without a checkpoint stays
        NOT_SERVING until LoadModel/UpdateWeights) — for ``timeout`` seconds (None: :func:`start_timeout`).
        Stops everything it started if that fails."""
        timeout = start_timeout() if timeout is None else timeout
        # CHATRL_PARENT_PID: a service drains and exits if this process dies, even by kill -9
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false", "CHATRL_PARENT_PID": str(os.getpid())}
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        try:
            for name in self.names:
                if not self.sections[name].get("port"):
                    raise ValueError(f"{name}.port must be set (non-zero) in the service config")
                cmd = [sys.executable, "-m", f"chatrl.services.{name}"] + (["--config", self.yaml] if self.yaml else [])
                cmd += sum((["--set", o.split(".", 1)[1]] for o in self.overrides if o.startswith(name + ".")), [])
                self._spawn[name] = (cmd, env)
                self.procs[name] = self._popen(name)
            self.wait(timeout, wait_for, serving)
        except BaseException:
            self.stop()
            raise
        return self

    def _popen(self, name: str) -> subprocess.Popen:
        cmd, env = self._spawn[name]
        path = self.log_path(name)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as out:  # the child keeps its own descriptor
                return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def supervise(self, max_restarts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                  poll_s: float = 0.2) -> LocalCluster:
        """Restart a service process that dies (as a Kubernetes Deployment would): same command, port and
        data, after a backoff that doubles with each restart of that service (``backoff_s`` ..
        ``max_backoff_s``), at most ``max_restarts`` times each; :attr:`restarts` counts them. A restarted
        model service comes back empty: the run brings it to its current model before using it."""

        def loop() -> None:
            due: dict[str, float] = {}
            while not self._stopping.wait(poll_s):
                for name, p in list(self.procs.items()):
                    if p.poll() is None or self._stopping.is_set():
                        continue
                    n = self.restarts.get(name, 0)
                    if n >= max_restarts:
                        continue  # gave up: callers see it UNAVAILABLE
                    due.setdefault(name, time.monotonic() + min(max_backoff_s, backoff_s * 2 ** n))
                    if time.monotonic() < due[name]:
                        continue
                    del due[name]
                    self.restarts[name] = n + 1
                    if self.log_dir:
                        with open(self.log_path(name), "ab") as f:
                            f.write(f"\n--- exited with code {p.returncode}; restart {n + 1} ---\n".encode())
                    self.procs[name] = self._popen(name)

        self._supervisor = threading.Thread(target=loop, name="launcher-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def down(self) -> list[str]:
        """The services whose process has exited and not (yet) been restarted — none once stopped."""
        if self._stopping.is_set():
            return []
        return [name for name, p in list(self.procs.items()) if p.poll() is not None]

    def wait(self, timeout: float, names: list[str] | None = None, serving: bool = True) -> None:
        """Until every one of ``names`` (default: all started) is SERVING (or answers health, if not
        ``serving``); a process that exits meanwhile is an error that quotes the end of its log."""
        ok = ("SERVING",) if serving else UP
        deadline = time.monotonic() + timeout
        pending = set(self.names if names is None else names)
        channels = {n: grpc.insecure_channel(self.address(n), options=[("grpc.enable_http_proxy", 0)])
                    for n in pending}
        try:
            while pending:
                for name, p in self.procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {p.returncode} during start-up"
                                           + self._log_tail(name))
                status = {n: health(channels[n]) for n in pending}
                pending = {n for n, st in status.items() if st not in ok}
                if pending and time.monotonic() > deadline:
                    logs = f"; their logs are in {self.log_dir}" if self.log_dir else ""
                    raise TimeoutError(
                        f"not {'SERVING' if serving else 'up'} after {timeout:g}s: "
                        + ", ".join(f"{n} ({status[n]})" for n in sorted(pending))
                        + f". The processes are alive, only slow: on a busy machine raise ${START_TIMEOUT_ENV} "
                        f"(seconds){logs}")
                if pending:
                    time.sleep(0.1)
        finally:
            for c in channels.values():
                c.close()

    def _log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_path(name)
        if not path or not path.exists():
            return ""
        return f" (log: {path}):\n" + path.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 15.0) -> dict[str, int]:
        """SIGTERM every process (they drain in-flight calls), SIGKILL what is left after ``grace``;
        returns each exit code."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + grace
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        self.procs.clear()
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


PIPELINE_SERVICES = ("policy", "reward", "reference", "feedback")


def launch_pipeline_services(services_yaml: str, overrides: list[str], run_dir: Path, device: str
                             ) -> LocalCluster:
    """policy-inference, reward-scoring, reference-model and feedback on free loopback ports, with no
    model loaded (each model service stays NOT_SERVING until LoadModel/UpdateWeights): feedback keeps its
    database in ``run_dir/feedback.db`` and samples from the launched policy; web page and metrics off;
    logs in ``run_dir/logs``. ``overrides`` (the run config's ``pipeline.service_overrides``) come last,
    so they win. Returns once every process answers health, supervised (:meth:`LocalCluster.supervise`)."""
    run_dir = Path(run_dir).resolve()
    names = list(PIPELINE_SERVICES)
    ports = dict(zip(names, free_ports(len(names))))
    over = [f"{n}.{k}" for n in names for k in ("host=127.0.0.1", f"port={ports[n]}", "metrics_port=-1")]
    over += [f"{n}.checkpoint=''" for n in ("policy", "reward", "reference")]
    over += [f"{n}.device={device}" for n in ("policy", "reward", "reference")]
    over += [f"feedback.db={run_dir / 'feedback.db'}", f"feedback.policy_address=127.0.0.1:{ports['policy']}",
             "feedback.web_port=-1"]
    cluster = LocalCluster(services_yaml, over + list(overrides), only=names, log_dir=run_dir / "logs")
    # start_timeout(): generous, $CHATRL_SERVICE_START_TIMEOUT; then a service that dies is restarted
    return cluster.start(serving=False).supervise()
