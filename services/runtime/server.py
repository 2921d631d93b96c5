"""Server bootstrap shared by every service.

A :class:`ServiceServer` wraps a ``grpc.server`` with:

- gRPC health checking (``grpc.health.v1``): NOT_SERVING until the service calls ``set_serving(True)``
  (after its model loaded), NOT_SERVING again while draining on shutdown;
- server reflection, so grpcurl-style clients can list and call every RPC;
- Prometheus metrics on a separate HTTP port: per-RPC request count by status code, latency histogram,
  in-flight gauge (``chatrl_<service>_rpc_*``), plus whatever the service registers on ``registry``;
- roles (:mod:`chatrl.services.runtime.roles`, one table from every RPC to the role it needs): each role's
  bearer token from a file or an env var (a k8s Secret) → ``UNAUTHENTICATED`` without a valid one,
  ``PERMISSION_DENIED`` with one of a role that may not call the method; a non-loopback bind without
  credentials is refused before anything binds (unless ``allow_insecure``);
- TLS or mutual TLS when cert paths are configured;
- per-method request-size limits from the same table, checked before the request is parsed
  (``RESOURCE_EXHAUSTED`` naming the method and the limit);
- capacity: data-plane unary calls and open response streams are capped separately (``RESOURCE_EXHAUSTED``
  beyond, immediately); health checks and the operator's control calls (UpdateWeights, LoadModel, …) do not
  count against either cap and have threads of their own, so they answer while the data plane is full;
- error mapping: a :class:`ServiceError` becomes its status + message; anything else is logged with
  its traceback and answered ``INTERNAL`` — never a traceback to the client, never a dead server;
- graceful shutdown on SIGTERM/SIGINT: stop accepting, drain in-flight calls for ``grace_seconds``.
"""

from __future__ import annotations

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

from chatrl.services.runtime import roles
from chatrl.services.runtime.errors import ServiceError, exhausted

log = logging.getLogger("chatrl.server")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # bind address; the k8s manifests set 0.0.0.0 inside pods
    port: int = 0  # 0 = pick a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1  # Prometheus /metrics port; -1 = off, 0 = pick a free port
    max_workers: int = 16  # unused: handler threads = max_concurrent_rpcs + max_streams + control_threads
    max_concurrent_rpcs: int = 64  # data-plane unary calls in flight; beyond, RESOURCE_EXHAUSTED immediately
    max_streams: int = 16  # response streams open at once (WatchRun, GenerateStream, Export); beyond, the same
    control_threads: int = 4  # threads kept for health checks and operator calls, outside both caps
    # largest message sent; received messages are capped per method by roles.METHODS (and by this)
    max_message_mb: int = 256
    # credentials, one per role (roles.py): a file (a mounted Secret) wins over the env var (a Secret through
    # secretKeyRef). None configured = development mode: everything open, on loopback only.
    auth_token_env: str = "CHATRL_AUTH_TOKEN"  # the operator's bearer token (the one token of older configs)
    auth_token_file: str = ""
    labeler_token_env: str = "CHATRL_LABELER_TOKEN"  # a team's shared labeler token (labeler ids self-declared)
    labeler_token_file: str = ""
    # one credential per labeler (a directory: file name = labeler id, content = token; a mounted Secret): its
    # holder labels only under that id. Unset with no shared token: labelers need the operator's.
    labelers_dir: str = ""
    allow_insecure: bool = False  # true: serve a non-loopback address with no credential (every method open)
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
        rule = roles.rule(method)
        limit = rule.max_request_bytes if rule else 4 * roles.KiB
        lane = "control" if roles.is_control(method) and not handler.response_streaming else \
            "stream" if handler.response_streaming else "data"
        deserialize = _sized(handler.request_deserializer, limit)
        if handler.request_streaming and handler.response_streaming:
            kind, fn = "stream_stream", handler.stream_stream
        elif handler.request_streaming:
            kind, fn = "stream_unary", handler.stream_unary
        elif handler.response_streaming:
            kind, fn = "unary_stream", handler.unary_stream
        else:
            kind, fn = "unary_unary", handler.unary_unary

        def admit(request):
            """Authorize, take a slot of the call's lane, and refuse an oversized request (in that order:
            an anonymous caller learns nothing about sizes). Returns the request (a checked iterator for a
            client stream) and whether a slot was taken."""
            owner.creds.authorize(method, md.get("authorization", ""))
            if not handler.request_streaming and isinstance(request, _TooLarge):
                raise _too_large(short, request, limit)
            owner._enter(lane, short)
            if handler.request_streaming:
                request = _checked_stream(request, short, limit)
            return request

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
                entered = False
                try:
                    request = admit(request)
                    entered = True
                    return fn(request, context)
                except BaseException as e:
                    code = e.code if isinstance(e, ServiceError) else (_code_of(context) or grpc.StatusCode.INTERNAL)
                    fail(context, e)
                finally:
                    if entered:
                        owner._leave(lane)
                    owner._observe(short, code, time.perf_counter() - t0)
        else:
            def behavior(request, context):
                t0 = time.perf_counter()
                owner._in_flight.labels(short).inc()
                code = grpc.StatusCode.OK
                entered = False
                try:
                    request = admit(request)
                    entered = True
                    yield from fn(request, context)
                except BaseException as e:
                    code = e.code if isinstance(e, ServiceError) else (_code_of(context) or grpc.StatusCode.INTERNAL)
                    if isinstance(e, GeneratorExit):
                        code = grpc.StatusCode.CANCELLED
                        raise
                    fail(context, e)
                finally:
                    if entered:
                        owner._leave(lane)
                    owner._observe(short, code, time.perf_counter() - t0)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(behavior, request_deserializer=deserialize,
                       response_serializer=handler.response_serializer)


class _TooLarge:
    """Stands in for a request message over its method's limit: it was never parsed."""

    def __init__(self, size: int) -> None:
        self.size = size


def _sized(deserializer, limit: int):
    def deserialize(raw: bytes):
        if len(raw) > limit:
            return _TooLarge(len(raw))
        return deserializer(raw) if deserializer is not None else raw
    return deserialize


def _too_large(short: str, req: _TooLarge, limit: int) -> ServiceError:
    return exhausted(f"request: {req.size} bytes exceeds {short}'s limit of {limit} bytes per message")


def _checked_stream(it, short: str, limit: int):
    for msg in it:
        if isinstance(msg, _TooLarge):
            raise _too_large(short, msg, limit)
        yield msg


def _code_of(context) -> grpc.StatusCode | None:
    try:
        return context.code()
    except Exception:  # older grpc
        return None


class ServiceServer:
    """One gRPC server for one service. ``service`` is the short name used in metric names."""

    def __init__(self, service: str, cfg: ServerConfig, mutating: Iterable[str] = ()) -> None:
        """``mutating`` is ignored (kept for old callers): :data:`roles.METHODS` decides who calls what.
        Raises :class:`roles.CredentialError` — before anything binds — for an unusable credential or a
        non-loopback ``host`` without one (unless ``allow_insecure``)."""
        self.service = service
        self.cfg = cfg
        self.creds = roles.Credentials(
            operator=roles.load_credential(cfg.auth_token_env, cfg.auth_token_file, f"{service}: auth_token_file"),
            labeler=roles.load_credential(cfg.labeler_token_env, cfg.labeler_token_file,
                                          f"{service}: labeler_token_file"),
            labelers=roles.load_labelers(cfg.labelers_dir, f"{service}: labelers_dir"))
        roles.check_exposure(service, [cfg.host], self.creds, cfg.allow_insecure)
        self.token = self.creds.operator  # the operator's credential (what older callers called the token)
        self._lanes = {"data": 0, "stream": 0, "control": 0}
        self._caps = {"data": cfg.max_concurrent_rpcs, "stream": cfg.max_streams}
        self._lanes_lock = threading.Lock()
        self.registry = CollectorRegistry()
        p = f"chatrl_{service}"
        self._requests = Counter(f"{p}_rpc_requests_total", "RPCs handled, by method and status code",
                                 ["method", "code"], registry=self.registry)
        self._latency = Histogram(f"{p}_rpc_latency_seconds", "RPC latency", ["method"], buckets=LATENCY_BUCKETS,
                                  registry=self.registry)
        self._in_flight = Gauge(f"{p}_rpc_in_flight", "RPCs in progress", ["method"], registry=self.registry)
        self._up = Gauge(f"{p}_up", "1 while the service is SERVING", registry=self.registry)
        mb = cfg.max_message_mb * 1024 * 1024
        # the transport refuses anything over the largest per-method limit before it is buffered whole
        receive = min(mb, max(r.max_request_bytes for r in roles.METHODS.values()))
        options = [("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", mb),
                   ("grpc.so_reuseport", 0)]
        if cfg.max_connection_age_s > 0:  # in-flight calls (long generations, weight pushes) get 10 min to end
            options += [("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", 600_000)]
        # no gRPC-wide maximum_concurrent_rpcs: it would refuse health checks too. The lanes cap the data
        # plane instead, and the pool has a thread for every admitted call plus control_threads more, so
        # the pool's FIFO queue never holds a health check behind admitted data-plane work.
        self.server = grpc.server(
            _thread_pool(cfg.max_concurrent_rpcs + cfg.max_streams + max(1, cfg.control_threads)),
            interceptors=[_AuthAndMetrics(self)], options=options)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                  reflection.SERVICE_NAME]
        self.port = 0
        self.metrics_port = 0
        self._metrics_httpd = None
        self._stopped = threading.Event()
        self.set_serving(False)

    def _enter(self, lane: str, short: str) -> None:
        with self._lanes_lock:
            cap = self._caps.get(lane)
            if cap is not None and self._lanes[lane] >= cap:
                what = "response streams" if lane == "stream" else "data-plane calls"
                raise exhausted(f"{short}: {cap} {what} already in progress; retry later")
            self._lanes[lane] += 1

    def _leave(self, lane: str) -> None:
        with self._lanes_lock:
            self._lanes[lane] -= 1

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
        if not self.creds.enabled:
            log.warning("%s: no credentials ($%s / auth_token_file unset) — every method is open (development "
                        "mode%s)", self.service, self.cfg.auth_token_env,
                        ", allow_insecure" if not roles.is_loopback(self.cfg.host) else ", loopback only")
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
