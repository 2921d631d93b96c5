"""``chatrl up``: every service as its own local process, for development — started, waited on until
healthy, and stopped (SIGTERM, then drained) on Ctrl-C. Also used by the pipeline and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from chatrl.clients.lib import FeedbackClient, PolicyClient, ReferenceClient, RewardClient, TrainerClient
from chatrl.services.runtime.config import SERVICES, load_services_config

CLIENTS = {"policy": PolicyClient, "reward": RewardClient, "reference": ReferenceClient, "trainer": TrainerClient,
           "feedback": FeedbackClient}


class LocalCluster:
    """Start services as subprocesses (``python -m services.<name>``) from one service config."""

    def __init__(self, services_yaml: str | None, overrides: list[str] | None = None,
                 only: list[str] | None = None, log_dir: Path | None = None, threads: int = 1) -> None:
        self.yaml = services_yaml if services_yaml and Path(services_yaml).exists() else None
        self.overrides = list(overrides or [])
        self.sections = load_services_config(self.yaml, self.overrides)
        self.names = [s for s in SERVICES if not only or s in only]
        self.log_dir = Path(log_dir) if log_dir else None
        self.threads = threads
        self.procs: dict[str, subprocess.Popen] = {}

    def address(self, name: str) -> str:
        sec = self.sections[name]
        host = sec.get("host", "127.0.0.1")
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{sec.get('port', 0)}"

    def start(self, timeout: float = 120.0, wait_for: list[str] | None = None) -> LocalCluster:
        """Start every service; wait until ``wait_for`` (default: all) report SERVING. A model service
        started without a checkpoint stays NOT_SERVING until its LoadModel."""
        # CHATRL_PARENT_PID: a service drains and exits if this process dies, even by kill -9
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false",
               "CHATRL_PARENT_PID": str(os.getpid())}
        for name in self.names:
            if not self.sections[name].get("port"):
                raise ValueError(f"{name}.port must be set (non-zero) in the service config for chatrl up")
            cmd = [sys.executable, "-m", f"chatrl.services.{name}"] + (["--config", self.yaml] if self.yaml else [])
            cmd += sum((["--set", o.split(".", 1)[1]] for o in self.overrides if o.startswith(name + ".")), [])
            if self.log_dir:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / f"{name}.log", "ab") as out:  # the child keeps its own descriptor
                    self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                        start_new_session=True)
            else:
                self.procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_healthy(timeout, wait_for)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names or self.names)
        clients = {n: CLIENTS[n](self.address(n), retries=1, timeout=2) for n in pending}  # one channel each
        try:
            while pending:
                for name, p in self.procs.items():
                    if p.poll() is not None:
                        hint = f" (log: {self.log_dir / (name + '.log')})" if self.log_dir else ""
                        raise RuntimeError(f"{name} exited with code {p.returncode} during start-up{hint}")
                pending = {n for n in pending if clients[n].health() != "SERVING"}
                if pending and time.monotonic() > deadline:
                    raise TimeoutError(f"not healthy after {timeout:.0f}s: {sorted(pending)}")
                if pending:
                    time.sleep(0.2)
        finally:
            for c in clients.values():
                c.close()

    def stop(self, grace: float = 15.0) -> dict[str, int]:
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


def run_up(services_yaml: str, overrides: list[str], only: list[str] | None = None) -> int:
    cluster = LocalCluster(services_yaml, overrides, only, log_dir=Path("runs/logs"))
    for name in cluster.names:
        ck = cluster.sections[name].get("checkpoint")
        if ck and not Path(ck).exists():
            print(f"chatrl up: {name}.checkpoint {ck} does not exist — run `make demo` (or `chatrl train ...`) "
                  f"first, or point it elsewhere with --set {name}.checkpoint=DIR", file=sys.stderr)
            return 2
    # Ctrl-C / SIGTERM only set a flag: a KeyboardInterrupt raised inside a gRPC call can leave its
    # threads hanging at exit, so the main loop notices the flag and stops the services itself.
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print(f"starting {', '.join(cluster.names)} (logs in runs/logs/) …", flush=True)
    cluster.start()
    for name in cluster.names:
        sec = cluster.sections[name]
        metrics = f"metrics http://127.0.0.1:{sec['metrics_port']}/metrics" if sec.get("metrics_port", -1) > 0 else ""
        print(f"  {name:10s} {cluster.address(name):22s} SERVING  {metrics}")
    print("ready — try `chatrl chat` or `chatrl status`; Ctrl-C stops everything", flush=True)
    while not stop and all(p.poll() is None for p in cluster.procs.values()):
        time.sleep(0.2)
    dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
    codes = cluster.stop()
    print("stopped: " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
    return 1 if dead else 0
