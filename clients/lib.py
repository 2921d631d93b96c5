"""Python client library: one typed client per service.

Every client takes an address (``host:port``), an optional bearer token (default: ``$CHATRL_AUTH_TOKEN``),
optional TLS (CA bundle, and client cert/key for mutual TLS), a default deadline, and retries calls that
fail with ``UNAVAILABLE`` (a service restarting, a pod rolling) with exponential backoff and jitter — by
gRPC's own retry policy, for the idempotent methods only (:mod:`chatrl.services.proto.channel`). Streaming
calls are retried only before their first message arrives.

The library speaks only the contract: the generated code and the codecs beside it
(``chatrl.services.proto``), so a client-only install (``pip install chatrl[client]``) needs neither torch
nor Ray. Tensors come back as numpy arrays.

    from chatrl.clients.lib import PolicyClient
    with PolicyClient("127.0.0.1:50051") as policy:
        res = policy.generate(["What did you think of the movie?"], n=2, max_new_tokens=32)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatrl.services.proto.channel import make_channel as _make_channel
from chatrl.services.proto.chatrl.v1 import (
    common_pb2,
    feedback_pb2,
    feedback_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from chatrl.services.proto.codecs import pack_state, tensor_from_proto
from chatrl.services.proto.enums import ROLE, STAGE


@dataclass
class ClientOptions:
    token: str | None = None  # bearer token; None = $CHATRL_AUTH_TOKEN (if set)
    tls_ca: str = ""  # PEM CA bundle → TLS
    tls_cert: str = ""  # PEM client certificate (mutual TLS)
    tls_key: str = ""
    timeout: float = 60.0  # default deadline per call, seconds
    retries: int = 5  # attempts for UNAVAILABLE, with backoff (idempotent methods; gRPC caps it at 5)
    backoff_s: float = 0.1  # first backoff; doubles each retry, capped at 2 s
    max_message_mb: int = 256


def make_channel(address: str, opts: ClientOptions) -> grpc.Channel:
    return _make_channel(address, tls_ca=opts.tls_ca, tls_cert=opts.tls_cert, tls_key=opts.tls_key,
                         max_message_mb=opts.max_message_mb, retries=opts.retries, backoff_s=opts.backoff_s)


class _Client:
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        self.address = address
        self.opts = options or ClientOptions(**kw)
        tok = self.opts.token if self.opts.token is not None else os.environ.get("CHATRL_AUTH_TOKEN", "")
        self._md = [("authorization", f"Bearer {tok}")] if tok else []
        self.channel = make_channel(address, self.opts)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn: Callable, request: Any, timeout: float | None = None) -> Any:
        # UNAVAILABLE is retried by the channel (idempotent methods only), inside this one deadline
        return fn(request, timeout=timeout or self.opts.timeout, metadata=self._md)

    def _stream(self, fn: Callable, request: Any, timeout: float | None = None) -> Iterator[Any]:
        return fn(request, timeout=timeout or self.opts.timeout, metadata=self._md)

    def health(self, service: str = "", timeout: float = 2.0) -> str:
        """'SERVING', 'NOT_SERVING', or 'UNAVAILABLE' when the server can't be reached."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return "UNAVAILABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                else e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_health_known(self, timeout: float = 60.0) -> str:
        """Block until the server answers health checks at all (SERVING or NOT_SERVING)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.health()
            if st in ("SERVING", "NOT_SERVING") or time.monotonic() > deadline:
                return st
            time.sleep(0.2)

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until the service reports SERVING (its model is loaded)."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            st = self.health()
            if st == "SERVING":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s (last status {st})")
            time.sleep(delay)
            delay = min(0.5, delay * 1.5)


def new_request_id() -> str:
    """A random idempotency key for one logical request (its retries share it)."""
    import uuid

    return uuid.uuid4().hex


def sampling_params(max_new_tokens: int = 0, temperature: float | None = None, top_k: int = 0,
                    top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                    n: int = 1) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, top_k=top_k, stop=list(stop), n=n)
    if temperature is not None:
        sp.temperature = temperature
    if top_p is not None:
        sp.top_p = top_p
    if seed is not None:
        sp.seed = seed
    return sp


def to_prompt(p: str | Sequence[int] | Sequence[dict]) -> common_pb2.Prompt:
    """A user message (str, rendered with the chat template), token ids, or a messages list."""
    if isinstance(p, str):
        return common_pb2.Prompt(chat=common_pb2.Conversation(messages=[chat_message("user", p)]))
    p = list(p)
    if p and isinstance(p[0], dict):
        return common_pb2.Prompt(chat=common_pb2.Conversation(messages=[chat_message(m["role"], m["content"])
                                                                         for m in p]))
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[int(t) for t in p]))


def chat_message(role: str, content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=ROLE.value(role), content=content)


class PolicyClient(_Client):
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        super().__init__(address, options, **kw)
        self.stub = policy_pb2_grpc.PolicyInferenceServiceStub(self.channel)
        self._weights_buf: bytearray | None = None  # packed weights, reused by the next push of the same model

    def generate(self, prompts: Sequence[str | Sequence[int] | Sequence[dict]], *, n: int = 1,
                 max_new_tokens: int = 0, temperature: float | None = None, top_k: int = 0,
                 top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 expected_model_version: int = 0, timeout: float | None = None) -> policy_pb2.GenerateResponse:
        req = policy_pb2.GenerateRequest(
            prompts=[to_prompt(p) for p in prompts],
            sampling=sampling_params(max_new_tokens, temperature, top_k, top_p, stop, seed, n),
            expected_model_version=expected_model_version)
        return self._call(self.stub.Generate, req, timeout)

    def generate_stream(self, prompt: str | Sequence[int] | Sequence[dict], *, max_new_tokens: int = 0,
                        temperature: float | None = None, top_k: int = 0, top_p: float | None = None,
                        stop: Sequence[str] = (), seed: int | None = None, timeout: float | None = None
                        ) -> Iterator[policy_pb2.GenerateStreamResponse]:
        req = policy_pb2.GenerateStreamRequest(
            prompt=to_prompt(prompt), sampling=sampling_params(max_new_tokens, temperature, top_k, top_p, stop, seed))
        return self._stream(self.stub.GenerateStream, req, timeout)

    def update_weights(self, state_dict: dict, version: int, chunk_bytes: int = 1 << 20,
                       metadata: dict[str, str] | None = None, timeout: float | None = None,
                       keep_buffer: bool = True) -> policy_pb2.UpdateWeightsResponse:
        """Push a full state dict as safetensors bytes in chunks, with its sha256; atomic swap server-side.
        The bytes are packed into a buffer this client keeps for the next push of the same model; a one-off
        push (``keep_buffer=False``: the next is far off, or of another size) lets it go afterwards.
        ``state_dict``: name → torch tensor or numpy array."""
        payload = pack_state(state_dict, self._weights_buf)
        self._weights_buf = payload if keep_buffer else None
        return self.update_weights_bytes(payload, version, chunk_bytes, metadata, timeout)

    def update_weights_bytes(self, payload: bytes | bytearray, version: int, chunk_bytes: int = 1 << 20,
                             metadata: dict[str, str] | None = None, timeout: float | None = None
                             ) -> policy_pb2.UpdateWeightsResponse:
        digest = hashlib.sha256(payload).hexdigest()
        view = memoryview(payload)

        def chunks() -> Iterable[policy_pb2.UpdateWeightsRequest]:
            for off in range(0, max(1, len(payload)), chunk_bytes):
                yield policy_pb2.UpdateWeightsRequest(chunk=policy_pb2.WeightsChunk(
                    version=version, sha256=digest, total_bytes=len(payload), offset=off,
                    data=bytes(view[off: off + chunk_bytes]), format="safetensors",
                    metadata=(metadata or {}) if off == 0 else {}))  # the server reads it from the first chunk

        # not retried by the channel (the payload outgrows gRPC's retry buffer), and idempotent by version:
        # wait_for_ready rides out a restarting server (UNAVAILABLE) until the deadline instead
        return self.stub.UpdateWeights(chunks(), timeout=timeout or self.opts.timeout, metadata=self._md,
                                       wait_for_ready=True)

    def model_info(self) -> common_pb2.ModelInfo:
        return self._call(self.stub.GetModelInfo, policy_pb2.PolicyInferenceServiceGetModelInfoRequest()).info


def serialize_weights(state_dict: dict) -> bytes:
    """The safetensors payload ``update_weights`` sends for ``state_dict``."""
    return bytes(pack_state(state_dict))


def replica_addresses(address: str) -> list[str]:
    """Every replica behind ``host:port``: each address the host resolves to (a Kubernetes headless Service
    resolves to one per pod), sorted. An IP literal, or a name that does not resolve, is returned as is."""
    import ipaddress
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return [address]
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return [address]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return [address]
    out = {f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for *_, (ip, *_rest) in infos}
    return sorted(out) or [address]


class ReplicaGroup:
    """All replicas of one model service, for the calls that must reach every one of them: UpdateWeights
    (policy-inference) and LoadModel (reward-scoring, reference-model). A load-balanced channel would
    deliver such a call to one pod only. The name is resolved again before each call, so replicas that
    joined since (autoscaling) get the model too and replicas that left are dropped.

    ``resolve`` maps the address to replica addresses (default :func:`replica_addresses`)."""

    def __init__(self, client_cls: type, address: str, resolve: Callable[[str], list[str]] | None = None,
                 **client_kw: Any) -> None:
        self.client_cls, self.address, self.client_kw = client_cls, address, client_kw
        self.resolve = resolve or replica_addresses
        self._clients: dict[str, Any] = {}
        self._payload: bytearray | None = None  # packed weights, reused between pushes

    def clients(self) -> dict[str, Any]:
        """address → client of every replica the name resolves to now."""
        now = self.resolve(self.address)
        for gone in set(self._clients) - set(now):
            self._clients.pop(gone).close()
        for a in now:
            if a not in self._clients:
                self._clients[a] = self.client_cls(a, **self.client_kw)
        return dict(self._clients)

    def _each(self, fn: Callable[[Any], Any]) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        clients = self.clients()
        with ThreadPoolExecutor(max_workers=min(16, len(clients))) as ex:
            futs = {a: ex.submit(fn, c) for a, c in clients.items()}
        out, failed = {}, {}
        for a, f in futs.items():
            try:
                out[a] = f.result()
            except grpc.RpcError as e:
                failed[a] = e
        if failed:
            still = set(self.resolve(self.address))
            lost = {a: e for a, e in failed.items() if a in still}  # a replica that left is not an error
            if lost:
                a, e = next(iter(lost.items()))
                raise ReplicaError(f"{len(lost)} of {len(clients)} replicas of {self.address} failed; {a}: "
                                   f"{e.code().name}: {e.details()}", lost) from e
        return out

    def update_weights(self, state_dict: dict, version: int, metadata: dict[str, str] | None = None,
                       chunk_bytes: int = 1 << 20, timeout: float | None = None,
                       keep_buffer: bool = True) -> dict[str, Any]:
        """Push ``state_dict`` as ``version`` to every policy-inference replica (packed once, into a buffer
        kept for the next push unless ``keep_buffer`` is false — see :meth:`PolicyClient.update_weights`)."""
        payload = pack_state(state_dict, self._payload)
        self._payload = payload if keep_buffer else None
        return self._each(lambda c: c.update_weights_bytes(payload, version, chunk_bytes, metadata, timeout))

    def load_model(self, checkpoint: str, version: int = 0, sha256: str = "") -> dict[str, Any]:
        """LoadModel on every reward-scoring / reference-model replica."""
        return self._each(lambda c: c.load_model(checkpoint, version, sha256))

    def model_versions(self) -> dict[str, int]:
        return self._each(lambda c: c.model_info().model_version)

    def wait_serving(self, timeout: float = 60.0) -> None:
        self._each(lambda c: c.wait_serving(timeout))

    def wait_health_known(self, timeout: float = 60.0) -> dict[str, str]:
        return self._each(lambda c: c.wait_health_known(timeout))

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()


class ReplicaError(RuntimeError):
    """A fan-out call failed on replicas that are still there (``failures``: address → grpc.RpcError)."""

    def __init__(self, message: str, failures: dict[str, Any]) -> None:
        super().__init__(message)
        self.failures = failures


class RewardClient(_Client):
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        super().__init__(address, options, **kw)
        self.stub = reward_pb2_grpc.RewardScoringServiceStub(self.channel)

    def score(self, prompts: Sequence[str], responses: Sequence[str], timeout: float | None = None
              ) -> reward_pb2.ScoreResponse:
        items = [reward_pb2.ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        return self._call(self.stub.Score, reward_pb2.ScoreRequest(items=items), timeout)

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                  timeout: float | None = None) -> reward_pb2.ScoreResponse:
        items = [reward_pb2.ScoreItem(prompt_token_ids=list(p), response_token_ids=list(r))
                 for p, r in zip(prompt_ids, response_ids, strict=True)]
        return self._call(self.stub.Score, reward_pb2.ScoreRequest(items=items), timeout)

    def load_model(self, checkpoint: str, version: int = 0, sha256: str = "") -> common_pb2.ModelInfo:
        req = reward_pb2.RewardScoringServiceLoadModelRequest(checkpoint_uri=str(checkpoint), model_version=version,
                                                              sha256=sha256)
        return self._call(self.stub.LoadModel, req).info

    def model_info(self) -> common_pb2.ModelInfo:
        return self._call(self.stub.GetModelInfo, reward_pb2.RewardScoringServiceGetModelInfoRequest()).info


class ReferenceClient(_Client):
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        super().__init__(address, options, **kw)
        self.stub = reference_pb2_grpc.ReferenceModelServiceStub(self.channel)

    def logprobs(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                 temperature: float | None = None, timeout: float | None = None) -> tuple[list, int]:
        """Per-token logprobs of each sequence from response_start on (float32 numpy arrays), version."""
        req = reference_pb2.LogProbsRequest(sequences=[
            reference_pb2.LogProbsSequence(token_ids=list(s), response_start=int(st))
            for s, st in zip(sequences, response_starts, strict=True)])
        if temperature is not None:
            req.temperature = temperature
        res = self._call(self.stub.LogProbs, req, timeout)
        return [tensor_from_proto(t, f"logprobs[{i}]") for i, t in enumerate(res.logprobs)], res.model_version

    def load_model(self, checkpoint: str, version: int = 0, sha256: str = "") -> common_pb2.ModelInfo:
        req = reference_pb2.ReferenceModelServiceLoadModelRequest(checkpoint_uri=str(checkpoint),
                                                                  model_version=version, sha256=sha256)
        return self._call(self.stub.LoadModel, req).info

    def model_info(self) -> common_pb2.ModelInfo:
        return self._call(self.stub.GetModelInfo, reference_pb2.ReferenceModelServiceGetModelInfoRequest()).info


class TrainerClient(_Client):
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        super().__init__(address, options, **kw)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def start_run(self, stage: str, config_yaml: str = "", overrides: dict[str, str] | None = None,
                  run_id: str = "", request_id: str = "") -> trainer_pb2.Run:
        """``stage``: pretrain, sft, reward, ppo or pipeline (the CLI's names; UnknownEnumError otherwise).
        ``request_id`` (default: a fresh random one) makes the retries of this call start one run."""
        req = trainer_pb2.StartRunRequest(stage=STAGE.value(stage), config_yaml=config_yaml, overrides=overrides or {},
                                          run_id=run_id, request_id=request_id or new_request_id())
        return self._call(self.stub.StartRun, req).run

    def get_run(self, run_id: str) -> trainer_pb2.Run:
        return self._call(self.stub.GetRun, trainer_pb2.GetRunRequest(run_id=run_id)).run

    def list_runs(self) -> list[trainer_pb2.Run]:
        return list(self._call(self.stub.ListRuns, trainer_pb2.ListRunsRequest()).runs)

    def watch_run(self, run_id: str, after_sequence: int = 0, include_logs: bool = True,
                  timeout: float | None = None) -> Iterator[trainer_pb2.RunEvent]:
        req = trainer_pb2.WatchRunRequest(run_id=run_id, after_sequence=after_sequence, include_logs=include_logs)
        for r in self._stream(self.stub.WatchRun, req, timeout or 24 * 3600):
            yield r.event

    def cancel_run(self, run_id: str, reason: str = "") -> trainer_pb2.Run:
        return self._call(self.stub.CancelRun, trainer_pb2.CancelRunRequest(run_id=run_id, reason=reason)).run

    def list_checkpoints(self, run_id: str) -> list[trainer_pb2.Checkpoint]:
        return list(self._call(self.stub.ListCheckpoints, trainer_pb2.ListCheckpointsRequest(run_id=run_id))
                    .checkpoints)


class FeedbackClient(_Client):
    def __init__(self, address: str, options: ClientOptions | None = None, **kw: Any) -> None:
        super().__init__(address, options, **kw)
        self.stub = feedback_pb2_grpc.FeedbackServiceStub(self.channel)

    def add_prompts(self, prompts: Sequence[str], source: str = "") -> feedback_pb2.AddPromptsResponse:
        req = feedback_pb2.AddPromptsRequest(prompts=[feedback_pb2.NewPrompt(text=p, source=source) for p in prompts])
        return self._call(self.stub.AddPrompts, req)

    def create_comparison_tasks(self, prompts: Sequence[str | Sequence[dict]], k: int, *, max_new_tokens: int = 0,
                                temperature: float | None = None, top_p: float | None = None,
                                seed: int | None = None, timeout: float | None = None, request_id: str = ""
                                ) -> feedback_pb2.CreateComparisonTasksResponse:
        """``prompts``: texts and conversations (lists of {"role","content"} ending with a user turn); the
        answer's task ids are the texts' first, then the conversations'. ``request_id`` (default: a fresh
        random one) makes the retries of this call create the tasks once."""
        texts = [p for p in prompts if isinstance(p, str)]
        chats = [common_pb2.Conversation(messages=[chat_message(m["role"], m["content"]) for m in p])
                 for p in prompts if not isinstance(p, str)]
        req = feedback_pb2.CreateComparisonTasksRequest(
            prompts=texts, conversations=chats, k=k,
            sampling=sampling_params(max_new_tokens, temperature, 0, top_p, (), seed),
            request_id=request_id or new_request_id())
        return self._call(self.stub.CreateComparisonTasks, req, timeout)

    def next_task(self, labeler_id: str) -> feedback_pb2.NextTaskResponse:
        return self._call(self.stub.NextTask, feedback_pb2.NextTaskRequest(labeler_id=labeler_id))

    def submit_ranking(self, submission_id: str, task_id: str, labeler_id: str, ranking: Sequence[int]
                       ) -> feedback_pb2.SubmitRankingResponse:
        req = feedback_pb2.SubmitRankingRequest(submission_id=submission_id, task_id=task_id, labeler_id=labeler_id,
                                                ranking=list(ranking))
        return self._call(self.stub.SubmitRanking, req)

    def submit_demonstration(self, submission_id: str, labeler_id: str, messages: Sequence[dict]
                             ) -> feedback_pb2.SubmitDemonstrationResponse:
        req = feedback_pb2.SubmitDemonstrationRequest(
            submission_id=submission_id, labeler_id=labeler_id,
            messages=[chat_message(m["role"], m["content"]) for m in messages])
        return self._call(self.stub.SubmitDemonstration, req)

    def export(self, kind: str, limit: int = 0, *, after_sequence: int = 0, wait_seconds: float = 0.0,
               timeout: float | None = None) -> list[str]:
        """JSONL lines of RANKINGS / DEMONSTRATIONS / PROMPTS in the trainer's formats, each with its
        "sequence"; only records stored after ``after_sequence``. ``wait_seconds`` > 0: if there are none
        yet, the server waits that long for one (long poll) — give a ``timeout`` longer than that."""
        req = feedback_pb2.ExportRequest(kind=feedback_pb2.ExportKind.Value(f"EXPORT_KIND_{kind.upper()}"),
                                         limit=limit, after_sequence=after_sequence, wait_seconds=wait_seconds)
        return [ln for r in self._stream(self.stub.Export, req, timeout) for ln in r.lines]

    def stats(self) -> feedback_pb2.GetStatsResponse:
        return self._call(self.stub.GetStats, feedback_pb2.GetStatsRequest())
