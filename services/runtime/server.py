"""Server bootstrap shared by every service.

A :class:`ServiceServer` wraps a ``grpc.server`` with:

- gRPC health checking (``grpc.health.v1``): NOT_SERVING until the service calls ``set_serving(True)``
  (after its model loaded), NOT_SERVING again while draining on shutdown;
- server reflection, so grpcurl-style clients can list and call every RPC;
- Prometheus metrics on a separate HTTP port: per-RPC request count by status code, latency histogram,
  in-flight gauge (``chatrl_<service>_rpc_*``), plus whatever the service registers on ``registry``;
- a bearer token (read from the env var named in config, e.g. from a k8s Secret) required on the
  service's mutating RPCs → ``UNAUTHENTICATED`` without it;
- TLS or mutual TLS when cert paths are configured; raised message-size limits;
- a bound on concurrent RPCs (``RESOURCE_EXHAUSTED`` beyond it, immediately);
- error mapping: a :class:`ServiceError` becomes its status + message; anything else is logged with
  its traceback and answered ``INTERNAL`` — never a traceback to the client, never a dead server;
- graceful shutdown on SIGTERM/SIGINT: stop accepting, drain in-flight calls for ``grace_seconds``.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from chatrl.services.runtime.errors import ServiceError

log = logging.getLogger("chatrl.server")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # bind address; the k8s manifests set 0.0.0.0 inside pods
    port: int = 0  # 0 = pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1  # Prometheus /metrics port; -1 = off, 0 = pick a free port
    max_workers: int = 16  # handler threads
    max_concurrent_rpcs: int = 64  # beyond this, RESOURCE_EXHAUSTED immediately
    max_message_mb: int = 256  # both directions (weights travel in chunks well below this)
    auth_token_env: str = "CHATRL_AUTH_TOKEN"  # env var holding the bearer token; unset/empty = no auth
    tls_cert: str = ""  # PEM server certificate (enables TLS)
    tls_key: str = ""  # PEM private key
    tls_client_ca: str = ""  # PEM CA bundle: when set, clients must present a certificate (mTLS)
    grace_seconds: float = 10.0  # drain time on shutdown
    # > 0: connections are closed (gracefully) after this long, so clients resolve the name again and
    # spread over replicas that joined since (Kubernetes scale-up); 0 = connections live forever
    max_connection_age_s: float = 0.0
    log_json: bool = False  # structured JSON log lines

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def server_fields() -> set[str]:
    return {f.name for f in fields(ServerConfig)}


class _AuthAndMetrics(grpc.ServerInterceptor):
    def __init__(self, owner: ServiceServer) -> None:
        self.owner = owner

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        short = method.rsplit("/", 1)[-1]
        md = dict(details.invocation_metadata or ())
        owner = self.owner
        needs_auth = short in owner.mutating and owner.token
        if handler.request_streaming and handler.response_streaming:
            kind, fn = "stream_stream", handler.stream_stream
        elif handler.request_streaming:
            kind, fn = "stream_unary", handler.stream_unary
        elif handler.response_streaming:
            kind, fn = "unary_stream", handler.unary_stream
        else:
            kind, fn = "unary_unary", handler.unary_unary

        def authorize(context) -> None:
            if needs_auth:
                got = md.get("authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {owner.token}".encode()):
                    raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                                       f"{short} requires 'authorization: Bearer <token>' metadata")

        def fail(context, e: BaseException) -> grpc.StatusCode:
            if isinstance(e, ServiceError):
                context.abort(e.code, e.message)
            code = _code_of(context)
            if code is not None and code != grpc.StatusCode.OK:  # the handler aborted itself
                raise e
            log.exception("unhandled error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {short} (see server log)")

        if kind in ("unary_unary", "stream_unary"):
            def behavior(request, context):
                t0 = time.perf_counter()
                owner._in_flight.labels(short).inc()
                code = grpc.StatusCode.OK
                try:
                    authorize(context)
                    return fn(request, context)
                except BaseException as e:
                    code = e.code if isinstance(e, ServiceError) else (_code_of(context) or grpc.StatusCode.INTERNAL)
                    fail(context, e)
                finally:
                    owner._observe(short, code, time.perf_counter() - t0)
        else:
            def behavior(request, context):
                t0 = time.perf_counter()
                owner._in_flight.labels(short).inc()
                code = grpc.StatusCode.OK
                try:
                    authorize(context)
                    yield from fn(request, context)
                except BaseException as e:
                    code = e.code if isinstance(e, ServiceError) else (_code_of(context) or grpc.StatusCode.INTERNAL)
                    if isinstance(e, GeneratorExit):
                        code = grpc.StatusCode.CANCELLED
                        raise
                    fail(context, e)
                finally:
                    owner._observe(short, code, time.perf_counter() - t0)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(behavior, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


def _code_of(context) -> grpc.StatusCode | None:
    try:
        return context.code()
    except Exception:  # older grpc
        return None


class ServiceServer:
    """One gRPC server for one service. ``service`` is the short name used in metric names."""

    def __init__(self, service: str, cfg: ServerConfig, mutating: Iterable[str] = ()) -> None:
        self.service = service
        self.cfg = cfg
        self.mutating = set(mutating)
        self.token = os.environ.get(cfg.auth_token_env, "") if cfg.auth_token_env else ""
        self.registry = CollectorRegistry()
        p = f"chatrl_{service}"
        self._requests = Counter(f"{p}_rpc_requests_total", "RPCs handled, by method and status code",
                                 ["method", "code"], registry=self.registry)
        self._latency = Histogram(f"{p}_rpc_latency_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self._in_flight = Gauge(f"{p}_rpc_in_flight", "RPCs in progress", ["method"], registry=self.registry)
        self._up = Gauge(f"{p}_up", "1 while the service is SERVING", registry=self.registry)
        mb = cfg.max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb),
                   ("grpc.so_reuseport", 0)]
        if cfg.max_connection_age_s > 0:  # in-flight calls (long generations, weight pushes) get 10 min to end
            options += [("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", 600_000)]
        self.server = grpc.server(
            _thread_pool(cfg.max_workers), interceptors=[_AuthAndMetrics(self)], options=options,
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                  reflection.SERVICE_NAME]
        self.port = 0
        self.metrics_port = 0
        self._metrics_httpd = None
        self._stopped = threading.Event()
        self.set_serving(False)

    def _observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._requests.labels(method, code.name).inc()
        self._latency.labels(method).observe(seconds)
        self._in_flight.labels(method).dec()

    def add_service(self, add_fn: Callable, servicer: Any, full_name: str) -> None:
        add_fn(servicer, self.server)
        self._names.append(full_name)

    def set_serving(self, serving: bool) -> None:
        st = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._names[2:]]:
            self.health.set(name, st)
        self._up.set(1 if serving else 0)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def start(self) -> int:
        reflection.enable_server_reflection(self._names, self.server)
        self.set_serving(False)  # also registers the service names added since __init__
        addr = f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls_cert:
            creds = tls_server_credentials(self.cfg)
            self.port = self.server.add_secure_port(addr, creds)
        else:
            self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"could not bind {addr}")
        self.server.start()
        if self.cfg.metrics_port >= 0:
            self._metrics_httpd, _ = start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_host,
                                                       registry=self.registry)
            self.metrics_port = self._metrics_httpd.server_port
        if self.mutating and not self.token:
            log.warning("%s: no auth token in $%s — mutating RPCs are open (development mode)", self.service,
                        self.cfg.auth_token_env)
        log.info("%s listening on %s (metrics port %s)", self.service, self.address, self.metrics_port or "off")
        return self.port

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self.set_serving(False)
        self.server.stop(self.cfg.grace_seconds if grace is None else grace).wait()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self._stopped.set()

    def serve_forever(self, on_stop: Callable[[], None] | None = None) -> None:
        """Block until SIGTERM/SIGINT, then drain in-flight calls and return."""
        stop = threading.Event()

        def handle(signum, _frame):
            log.info("%s: signal %d, draining for up to %.0fs", self.service, signum, self.cfg.grace_seconds)
            stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        parent = int(os.environ.get("CHATRL_PARENT_PID", "0") or 0)
        if parent:  # started by a local cluster: don't outlive it (it may die by kill -9)
            threading.Thread(target=_watch_parent, args=(parent, stop, self.service), daemon=True).start()
        stop.wait()
        self.stop()
        if on_stop is not None:
            on_stop()
        log.info("%s: stopped", self.service)


def _watch_parent(pid: int, stop: threading.Event, service: str) -> None:
    while not stop.wait(1.0):
        if os.getppid() != pid:
            log.info("%s: parent process %d is gone; draining", service, pid)
            stop.set()


def _thread_pool(n: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="grpc")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tls_server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials:
    if not cfg.tls_key:
        raise ValueError("tls_key is required when tls_cert is set")
    ca = _read(cfg.tls_client_ca) if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(_read(cfg.tls_key), _read(cfg.tls_cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)
