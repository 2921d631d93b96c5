"""feedback service: thin gRPC glue over :class:`chatrl.services.core.feedback_store.FeedbackStore`.

Every ``FeedbackService`` RPC of ``protos/chatrl/v1/feedback.proto``. ``CreateComparisonTasks`` asks
policy-inference (``policy_address``) for K samples per prompt through the generated stub (services never
import the client library), then stores one ranking task per prompt. Submissions are on disk before the RPC
returns (SQLite WAL, ``synchronous=FULL``). Optionally serves the labeling page (``web_port``).

Run it: ``python -m chatrl.services.feedback --db runs/feedback.db --port 50055`` (or ``chatrl serve feedback``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import timezone

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from chatrl.services.core.feedback_store import FeedbackStore, StoreError
from chatrl.services.proto.channel import make_channel
from chatrl.services.proto.chatrl.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from chatrl.services.proto.enums import EXPORT_KIND, RESPONSE_FLAG, ROLE
from chatrl.services.runtime import roles
from chatrl.services.runtime.errors import ServiceError, domain_error, invalid, require
from chatrl.services.runtime.logs import event
from chatrl.services.runtime.main import run_service
from chatrl.services.runtime.server import ServerConfig, ServiceServer

log = logging.getLogger("chatrl.feedback")

_EXPORT_KINDS = {EXPORT_KIND.value(k): k for k in EXPORT_KIND.names}
_ROLE_VALUES = {ROLE.value(r) for r in ROLE.names}
_FLAG_NUMBERS = {RESPONSE_FLAG.value(f) for f in RESPONSE_FLAG.names}


def _conversation(msgs: list[dict]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=ROLE.value(m["role"]), content=m["content"])
                                             for m in msgs])


def _messages(conv: common_pb2.Conversation, field: str) -> list[dict]:
    out = []
    for i, m in enumerate(conv.messages):
        if m.role not in _ROLE_VALUES:
            raise invalid(f"{field}[{i}].role", "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        out.append({"role": ROLE.name(m.role), "content": m.content})
    return out


@dataclass
class FeedbackConfig:
    db: str = "runs/feedback/feedback.db"  # SQLite database file (created if missing)
    policy_address: str = "127.0.0.1:50051"  # policy-inference host:port, for CreateComparisonTasks
    policy_tls_ca: str = ""  # PEM CA bundle to reach policy-inference over TLS (empty = plaintext)
    policy_timeout_s: float = 300.0  # deadline of one Generate call (capped by the caller's deadline)
    generate_batch: int = 32  # prompts per Generate call (each with k samples)
    max_k: int = 16  # largest K accepted by CreateComparisonTasks
    max_prompts: int = 1024  # most prompts per CreateComparisonTasks / AddPrompts call
    lease_seconds: float = 600.0  # how long NextTask reserves a task for its labeler
    rankings_per_task: int = 1  # rankings (by distinct labelers) after which a task is no longer open
    overlap_fraction: float = 0.0  # fraction of new tasks that go to overlap_labelers labelers (agreement)
    overlap_labelers: int = 2  # distinct rankings an overlapping task needs (>= 2)
    export_batch_lines: int = 256  # JSONL lines per Export stream message (also capped at ~1 MiB)
    web_host: str = "127.0.0.1"  # labeling page bind address
    web_port: int = -1  # labeling page port; -1 = off, 0 = pick a free port
    web_allowed_hosts: list[str] = field(default_factory=list)  # Host names of the page (an ingress's); empty:
    #   loopback names on a loopback bind, any elsewhere
    web_max_threads: int = 32  # labeling-page requests handled at once (beyond: 503)
    web_chat_max_new_tokens: int = 128  # longest reply the app's chat (and its alternatives) samples
    web_alternatives_k: int = 4  # K of a chat-then-compare task: the shown reply + K-1 alternatives
    max_db_mb: float = 0  # > 0: cap the database file; writes beyond answer RESOURCE_EXHAUSTED (disk full)


def _abort(e: StoreError) -> ServiceError:
    return domain_error(e.kind, e.message)


def _ts(us: int | None) -> Timestamp | None:
    if us is None:
        return None
    t = Timestamp()
    t.FromMicroseconds(int(us))
    return t


class Metrics:
    def __init__(self, registry, store: FeedbackStore) -> None:
        self.labels = Counter("chatrl_feedback_labels_submitted_total", "new labels stored, by kind",
                              ["kind"], registry=registry)
        self.duplicates = Counter("chatrl_feedback_duplicate_submissions_total",
                                  "idempotent resubmissions (nothing new stored), by kind", ["kind"],
                                  registry=registry)
        self.tasks = Counter("chatrl_feedback_tasks_created_total", "comparison tasks created", registry=registry)
        self.prompts = Counter("chatrl_feedback_prompts_added_total", "new prompts added to the pool",
                               registry=registry)
        self.sample_s = Histogram("chatrl_feedback_policy_sample_seconds",
                                  "time to sample K responses for one CreateComparisonTasks call",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                  registry=registry)
        self.labels_by_labeler = Counter("chatrl_feedback_labeler_submissions_total",
                                         "new labels stored through the labeling app, by kind", ["kind"],
                                         registry=registry)
        for kind in ("ranking", "skip", "demonstration"):  # every series exists from the start (rates, alerts)
            self.labels.labels(kind)
            self.duplicates.labels(kind)
        registry.register(_StoreCounts(store))

    def submitted(self, kind: str, duplicate: bool) -> None:
        (self.duplicates if duplicate else self.labels).labels(kind).inc()


class _StoreCounts:
    """Open tasks and records by kind, from one ``store.stats()`` per scrape (not one per sample)."""

    KINDS = ("prompts", "tasks", "rankings", "demonstrations")

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def _families(self, st: dict | None):
        fams = GaugeMetricFamily("chatrl_feedback_open_tasks", "comparison tasks not yet ranked"), \
            GaugeMetricFamily("chatrl_feedback_records", "records stored, by kind", labels=["kind"]), \
            GaugeMetricFamily("chatrl_feedback_leased_tasks", "open tasks a labeler holds a lease on now"), \
            GaugeMetricFamily("chatrl_feedback_active_labelers", "labelers holding a lease or who stored a "
                              "label in the last 15 minutes")
        if st is not None:
            fams[0].add_metric([], st["open_tasks"])
            for kind in self.KINDS:
                fams[1].add_metric([kind], st[kind])
            fams[2].add_metric([], st["leased_tasks"])
            fams[3].add_metric([], st["active_labelers"])
        return fams

    def describe(self):  # names only: registering must not query the database
        return (*self._families(None), *self._agreement({"overall": {"pairwise": 0, "kendall_tau": 0,
                                                                     "compared": 0}, "labelers": {}}))

    def collect(self):
        yield from self._families(self.store.stats())
        yield from self._agreement(self.store.agreement())

    @staticmethod
    def _agreement(a: dict):
        """Agreement between labelers, overall and per labeler (InstructGPT reports ~73% pairwise)."""
        pw = GaugeMetricFamily("chatrl_feedback_agreement_ratio", "mean pairwise agreement between labelers on "
                               "the tasks several ranked (scope: overall, or one labeler vs the others)",
                               labels=["scope"])
        tau = GaugeMetricFamily("chatrl_feedback_kendall_tau", "mean Kendall's tau-b between labelers' "
                                "rankings of the same task", labels=["scope"])
        n = GaugeMetricFamily("chatrl_feedback_agreement_comparisons", "pairs of rankings of one task by two "
                              "labelers compared", labels=["scope"])
        for scope, v in [("overall", a["overall"]), *a["labelers"].items()]:
            pw.add_metric([scope], v["pairwise"])
            tau.add_metric([scope], v["kendall_tau"])
            n.add_metric([scope], v["compared"])
        return pw, tau, n


class PolicySampler:
    """(prompt texts, k, SamplingParams) → K responses and finished flags per prompt, model version —
    over policy-inference's ``Generate``; chunks of ``generate_batch`` prompts pinned to one version."""

    def __init__(self, cfg: FeedbackConfig) -> None:
        self.cfg = cfg
        self._channel: grpc.Channel | None = None
        self._stub: policy_pb2_grpc.PolicyInferenceServiceStub | None = None
        self._lock = threading.Lock()
        tok = os.environ.get("CHATRL_AUTH_TOKEN", "")  # the deployment's shared token, as every client sends
        self._md = [("authorization", f"Bearer {tok}")] if tok else []

    @property
    def stub(self) -> policy_pb2_grpc.PolicyInferenceServiceStub:
        with self._lock:
            if self._stub is None:  # Generate is retried on UNAVAILABLE by the channel (3 attempts)
                self._channel = make_channel(self.cfg.policy_address, tls_ca=self.cfg.policy_tls_ca, retries=3)
                self._stub = policy_pb2_grpc.PolicyInferenceServiceStub(self._channel)
            return self._stub

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = self._stub = None

    def sample(self, texts: list[str], k: int, sp: common_pb2.SamplingParams, timeout: float | None
               ) -> tuple[list[list[str]], list[list[bool]], int]:
        for attempt in range(2):  # the weights may be swapped between chunks: start over once
            try:
                return self._sample_once(texts, k, sp, timeout)
            except _VersionChanged:
                if attempt:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, "policy-inference kept swapping weights "
                                       "while the comparison tasks were sampled; retry") from None
        raise AssertionError("unreachable")

    def _sample_once(self, texts, k, sp, timeout):
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(sp)
        sampling.n = k
        responses: list[list[str]] = []
        finished: list[list[bool]] = []
        version = 0
        step = max(1, self.cfg.generate_batch)
        for off in range(0, len(texts), step):
            if sp.HasField("seed") and off:
                sampling.seed = sp.seed + off * k  # distinct samples for every prompt, still reproducible
            req = policy_pb2.GenerateRequest(  # a text is one user turn; a list of messages, a conversation
                prompts=[common_pb2.Prompt(chat=_conversation([{"role": "user", "content": t}] if isinstance(t, str)
                                                               else t)) for t in texts[off: off + step]],
                sampling=sampling, expected_model_version=version)
            try:
                res = self.stub.Generate(req, timeout=timeout or self.cfg.policy_timeout_s, metadata=self._md)
            except grpc.RpcError as e:
                raise self._map(e, version) from None
            version = res.model_version
            if len(res.results) != len(texts[off: off + step]):
                raise ServiceError(grpc.StatusCode.INTERNAL, "policy-inference returned the wrong number "
                                   "of results")
            for r in res.results:
                responses.append([c.text for c in r.completions])
                finished.append([c.finish_reason == common_pb2.FINISH_REASON_STOP for c in r.completions])
        return responses, finished, version

    def stream(self, messages: list[dict], sp: common_pb2.SamplingParams, timeout: float | None):
        """One reply to a conversation over ``GenerateStream``: yields {"delta": text} events, then
        {"end": {"text","finished","model_version"}}; errors are ServiceErrors as for ``sample``."""
        req = policy_pb2.GenerateStreamRequest(prompt=common_pb2.Prompt(chat=_conversation(messages)), sampling=sp)
        try:
            for res in self.stub.GenerateStream(req, timeout=timeout or self.cfg.policy_timeout_s, metadata=self._md):
                if res.HasField("delta"):
                    if res.delta.text:
                        yield {"delta": res.delta.text}
                else:
                    yield {"end": {"text": res.end.text, "model_version": res.model_version,
                                   "finished": res.end.finish_reason == common_pb2.FINISH_REASON_STOP}}
        except grpc.RpcError as e:
            raise self._map(e, 0) from None

    def _map(self, e: grpc.RpcError, pinned: int) -> Exception:
        code, msg = e.code(), e.details() or ""
        if code == grpc.StatusCode.FAILED_PRECONDITION and pinned:
            return _VersionChanged()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAUTHENTICATED):
            if code == grpc.StatusCode.INVALID_ARGUMENT and not msg.startswith("sampling"):
                msg = f"sampling: {msg}"
            return ServiceError(code, f"{msg} (from policy-inference)")
        return ServiceError(grpc.StatusCode.UNAVAILABLE,
                            f"policy-inference at {self.cfg.policy_address} unreachable: {code.name} {msg}")


class _VersionChanged(Exception):
    pass


class ChatPolicy:
    """What the labeling app asks of policy-inference (``web.LabelingWeb``'s ``policy``): a streamed reply
    for its chat and K − 1 alternatives to rank, with the service's sampler and deadline."""

    def __init__(self, sampler: PolicySampler) -> None:
        self.sampler = sampler

    def stream(self, messages: list[dict], max_new_tokens: int):
        return self.sampler.stream(messages, common_pb2.SamplingParams(max_new_tokens=max_new_tokens), None)

    def sample(self, prompts: list, k: int, max_new_tokens: int):
        return self.sampler.sample(prompts, k, common_pb2.SamplingParams(max_new_tokens=max_new_tokens), None)


class FeedbackServicer(feedback_pb2_grpc.FeedbackServiceServicer):
    def __init__(self, cfg: FeedbackConfig, registry, store: FeedbackStore | None = None) -> None:
        self.cfg = cfg
        self.store = store or FeedbackStore(cfg.db, lease_seconds=cfg.lease_seconds,
                                            rankings_per_task=cfg.rankings_per_task, max_k=cfg.max_k,
                                            max_db_mb=cfg.max_db_mb, overlap_fraction=cfg.overlap_fraction,
                                            overlap_labelers=cfg.overlap_labelers)
        self.metrics = Metrics(registry, self.store)
        self.sampler = PolicySampler(cfg)
        self.web = None
        self.creds = roles.Credentials()  # the server's (build() sets them): whose labeler id a call may use

    def _labeler(self, requested: str, context) -> str:
        """The labeler id the call labels under: a per-labeler credential's own (PERMISSION_DENIED for
        another's), else the request's (roles.Credentials.labeler_id)."""
        md = dict(context.invocation_metadata() or ())
        return self.creds.labeler_id(self.creds.caller(md.get("authorization", "")), requested)

    def close(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.sampler.close()
        self.store.close()

    # -- RPCs ------------------------------------------------------------------------------------

    def AddPrompts(self, request, context):
        require(len(request.prompts) > 0, "prompts", "must not be empty")
        require(len(request.prompts) <= self.cfg.max_prompts, "prompts",
                f"at most {self.cfg.max_prompts} per call, got {len(request.prompts)}")
        try:
            ids, added = self.store.add_prompts([(p.text, p.source) for p in request.prompts])
        except StoreError as e:
            raise _abort(e) from None
        self.metrics.prompts.inc(added)
        return feedback_pb2.AddPromptsResponse(prompt_ids=ids, added=added)

    def CreateComparisonTasks(self, request, context):
        k = request.k
        require(k >= 2, "k", f"must be >= 2 (responses to rank per prompt), got {k}")
        require(k <= self.cfg.max_k, "k", f"must be <= {self.cfg.max_k}, got {k}")
        n = len(request.prompts) + len(request.prompt_ids) + len(request.conversations)
        require(n <= self.cfg.max_prompts, "prompts", f"at most {self.cfg.max_prompts} prompts per call, got {n}")
        sp = request.sampling
        require(sp.max_new_tokens >= 0, "sampling.max_new_tokens", f"must be >= 0, got {sp.max_new_tokens}")
        remaining = context.time_remaining()
        timeout = min(self.cfg.policy_timeout_s, remaining) if remaining is not None else None
        timer = self.metrics.sample_s.time()

        def sample(texts, kk):
            with timer:
                return self.sampler.sample(texts, kk, sp, timeout)

        try:
            ids, version = self.store.create_comparison_tasks(list(request.prompts), list(request.prompt_ids), k,
                                                              sample, source="comparison-request",
                                                              request_id=request.request_id,
                                                              conversations=[_messages(c, f"conversations[{i}]")
                                                                             for i, c in enumerate(request.conversations)])
        except StoreError as e:
            raise _abort(e) from None
        self.metrics.tasks.inc(len(ids))
        event(log, "comparison tasks created", tasks=len(ids), k=k, policy_model_version=version)
        return feedback_pb2.CreateComparisonTasksResponse(task_ids=ids, policy_model_version=version)

    def NextTask(self, request, context):
        try:
            task, remaining = self.store.next_task(self._labeler(request.labeler_id, context))
        except StoreError as e:
            raise _abort(e) from None
        if task is None:
            return feedback_pb2.NextTaskResponse(remaining=0)
        return feedback_pb2.NextTaskResponse(task=self.task_proto(task), remaining=remaining)

    @staticmethod
    def task_proto(t: dict) -> feedback_pb2.ComparisonTask:
        return feedback_pb2.ComparisonTask(
            task_id=t["task_id"], prompt_id=t["prompt_id"], prompt=t["prompt"], responses=t["responses"],
            policy_model_version=t["policy_model_version"], created_at=_ts(t["created_us"]),
            lease_expires_at=_ts(t["lease_expires_us"]), responses_finished=t["finished"],
            conversation=_conversation(t["messages"]))

    def SubmitRanking(self, request, context):
        try:
            assessments = []
            for i, a in enumerate(request.assessments):
                flags = [RESPONSE_FLAG.name(f) if f in _FLAG_NUMBERS else "" for f in a.flags]
                if "" in flags:
                    raise invalid(f"assessments[{i}].flags", "must be RESPONSE_FLAG_* values other than UNSPECIFIED")
                assessments.append({"rating": a.rating, "flags": flags})
            rid, dup, pairs = self.store.submit_ranking(request.submission_id, request.task_id,
                                                        self._labeler(request.labeler_id, context),
                                                        list(request.ranking),
                                                        list(request.tied_with_next), assessments)
        except StoreError as e:
            raise _abort(e) from None
        self.metrics.submitted("ranking", dup)
        return feedback_pb2.SubmitRankingResponse(ranking_id=rid, duplicate=dup, pairs=pairs)

    def SkipTask(self, request, context):
        try:
            sid, dup = self.store.skip_task(request.submission_id, request.task_id,
                                            self._labeler(request.labeler_id, context),
                                            request.reason)
        except StoreError as e:
            raise _abort(e) from None
        self.metrics.submitted("skip", dup)
        return feedback_pb2.SkipTaskResponse(skip_id=sid, duplicate=dup)

    def SubmitDemonstration(self, request, context):
        msgs = _messages(request, "messages")
        try:
            did, dup = self.store.submit_demonstration(request.submission_id,
                                                       self._labeler(request.labeler_id, context), msgs)
        except StoreError as e:
            raise _abort(e) from None
        self.metrics.submitted("demonstration", dup)
        return feedback_pb2.SubmitDemonstrationResponse(demonstration_id=did, duplicate=dup)

    def Export(self, request, context):
        kind = _EXPORT_KINDS.get(request.kind)
        if kind is None:
            raise invalid("kind", "must be EXPORT_KIND_RANKINGS, _DEMONSTRATIONS, _PROMPTS or _PAIRS")
        require(request.limit >= 0, "limit", f"must be >= 0, got {request.limit}")
        require(request.after_sequence >= 0, "after_sequence", f"must be >= 0, got {request.after_sequence}")
        require(request.wait_seconds >= 0, "wait_seconds", f"must be >= 0, got {request.wait_seconds}")
        since = request.since.ToDatetime(tzinfo=timezone.utc) if request.HasField("since") else None
        cursor = request.after_sequence
        try:
            if request.wait_seconds > 0:  # long poll: hold the call until a record exists after the cursor
                remaining = context.time_remaining()
                wait = request.wait_seconds if remaining is None else min(request.wait_seconds, remaining - 0.5)
                self.store.wait_for_new(kind, cursor, wait, stop=lambda: not context.is_active())
            rows = self.store.export(kind, since=since, limit=request.limit, after_sequence=cursor)
            batch: list[str] = []
            size = 0
            for row in rows:
                line = json.dumps(row, ensure_ascii=False)
                # a message ends only where a record ends (a ranking's pairs share its sequence): the cursor
                # it carries then never points past half a record
                if batch and row["sequence"] != cursor and (len(batch) >= self.cfg.export_batch_lines
                                                            or size + len(line) > (1 << 20)):
                    yield feedback_pb2.ExportResponse(lines=batch, next_after_sequence=cursor)
                    batch, size = [], 0
                batch.append(line)
                size += len(line)
                cursor = row["sequence"]
            if batch:
                yield feedback_pb2.ExportResponse(lines=batch, next_after_sequence=cursor)
        except StoreError as e:
            raise _abort(e) from None

    def GetStats(self, request, context):
        a = self.store.agreement()
        return feedback_pb2.GetStatsResponse(
            **self.store.stats(), agreement=feedback_pb2.Agreement(**a["overall"]),
            labelers=[feedback_pb2.LabelerAgreement(labeler_id=who, agreement=feedback_pb2.Agreement(**v))
                      for who, v in a["labelers"].items()])


def build(server_cfg: ServerConfig, cfg: FeedbackConfig) -> tuple[ServiceServer, FeedbackServicer]:
    srv = ServiceServer("feedback", server_cfg)  # who may call what: runtime/roles.py
    if cfg.web_port >= 0:  # the page's exposure is checked before anything binds, like the server's
        roles.check_exposure("feedback web page", [cfg.web_host], srv.creds, server_cfg.allow_insecure)
    svc = FeedbackServicer(cfg, srv.registry)
    svc.creds = srv.creds
    srv.add_service(feedback_pb2_grpc.add_FeedbackServiceServicer_to_server, svc,
                    feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"].full_name)
    srv.start()
    if cfg.web_port >= 0:
        from chatrl.services.feedback.web import LabelingWeb

        svc.web = LabelingWeb(svc.store, cfg.web_host, cfg.web_port, auth=srv.creds, metrics=svc.metrics,
                              allowed_hosts=cfg.web_allowed_hosts, max_threads=cfg.web_max_threads,
                              allow_insecure=server_cfg.allow_insecure, policy=ChatPolicy(svc.sampler),
                              chat_max_new_tokens=cfg.web_chat_max_new_tokens,
                              alternatives_k=cfg.web_alternatives_k)
        svc.web.start()
        log.info("labeling page at %s", svc.web.url)
    srv.set_serving(True)  # the store is open: nothing else to load
    return srv, svc


def _translate(argv: list[str]) -> list[str]:
    """``--db PATH`` / ``--policy HOST:PORT`` / ``--web-port N`` → ``--set`` overrides of the section."""
    out, flags = [], {"--db": "db", "--policy": "policy_address", "--policy-address": "policy_address",
                      "--web-port": "web_port"}
    it = iter(argv)
    for a in it:
        key, _, val = a.partition("=")
        if key in flags:
            if not _:
                val = next(it, None)
                if val is None:
                    raise SystemExit(f"chatrl serve feedback: error: {key} needs a value")
            out += ["--set", f"{flags[key]}={json.dumps(val) if flags[key] != 'web_port' else val}"]
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print("feedback options (besides the common ones below): --db PATH  --policy HOST:PORT  --web-port N")
    return run_service("feedback", FeedbackConfig, build, _translate(argv))
