"""Channels to the services (hand-written; ``make proto`` never touches this file): message limits, TLS,
round-robin over every address a name resolves to, and the one retry policy.

Retries are gRPC's own (the channel's service config ``retryPolicy``), not loops in the clients: a call
that fails with ``UNAVAILABLE`` (a service restarting, a pod rolling) is re-sent with exponential backoff,
each attempt inside the call's one deadline, and only for the methods in :data:`IDEMPOTENT` — reads, and
writes that are idempotent by the request's own key. A streaming call is retried only until its first
response arrives (gRPC commits the call then). ``UpdateWeights`` is not in the table: its payload is
larger than gRPC's per-call retry buffer; it waits for the channel to be ready instead (see the client).
"""

from __future__ import annotations

import json

import grpc

PACKAGE = "chatrl.v1"
# service → methods safe to send twice
IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "PolicyInferenceService": ("Generate", "GenerateStream", "GetModelInfo"),  # no side effects
    "RewardScoringService": ("Score", "GetModelInfo", "LoadModel"),  # LoadModel of the same checkpoint again
    "ReferenceModelService": ("LogProbs", "GetModelInfo", "LoadModel"),
    # StartRun is keyed by request_id (the client library always sends one); cancelling twice changes nothing
    "TrainerService": ("GetRun", "ListRuns", "WatchRun", "ListCheckpoints", "StartRun", "CancelRun"),
    # SubmitRanking / SubmitDemonstration are keyed by submission_id (a resubmission is a no-op),
    # CreateComparisonTasks by request_id; AddPrompts and NextTask (a lease) are not retried
    "FeedbackService": ("SubmitRanking", "SubmitDemonstration", "Export", "GetStats", "CreateComparisonTasks"),
    "grpc.health.v1.Health": ("Check",),
}
MAX_ATTEMPTS = 5  # gRPC's ceiling: a larger maxAttempts is treated as 5


def service_config(attempts: int = MAX_ATTEMPTS, backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> str:
    """The channel's service config: UNAVAILABLE retried ``attempts`` times in all (at most 5), the
    backoff before retry n drawn from (0, min(max_backoff_s, backoff_s · 2^n)]."""
    names = [{"service": s if "." in s else f"{PACKAGE}.{s}", "method": m}
             for s, methods in IDEMPOTENT.items() for m in methods]
    cfg: dict = {"methodConfig": [{"name": names}]}
    if attempts > 1:
        cfg["methodConfig"][0]["retryPolicy"] = {
            "maxAttempts": min(MAX_ATTEMPTS, attempts), "initialBackoff": f"{max(0.001, backoff_s):.3f}s",
            "maxBackoff": f"{max_backoff_s:.3f}s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps(cfg)


def make_channel(address: str, *, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 max_message_mb: int = 256, retries: int = MAX_ATTEMPTS, backoff_s: float = 0.1) -> grpc.Channel:
    """A channel to ``address`` (``host:port``); TLS when given a CA bundle or a client certificate."""
    mb = max_message_mb * 1024 * 1024
    options = [("grpc.max_receive_message_length", mb), ("grpc.max_send_message_length", mb),
               ("grpc.enable_http_proxy", 0),
               # round_robin: a name with several addresses (a Kubernetes headless Service: one per pod)
               # spreads calls over all of them instead of pinning the channel to the first
               ("grpc.lb_policy_name", "round_robin"),
               ("grpc.enable_retries", 1), ("grpc.service_config", service_config(retries, backoff_s)),
               # reconnect soon after a restart, so the retries above find the new process
               ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 2000)]
    if tls_ca or tls_cert:
        def rd(p: str) -> bytes | None:
            return open(p, "rb").read() if p else None

        creds = grpc.ssl_channel_credentials(rd(tls_ca), rd(tls_key), rd(tls_cert))
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)
