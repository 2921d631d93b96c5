"""Errors a service raises on purpose; the server interceptor maps them to gRPC status codes.

Anything else escaping a handler is logged with its traceback and answered ``INTERNAL`` with a
generic message: a client never sees a traceback, and the server keeps serving."""

from __future__ import annotations

import math
from collections.abc import Sequence

import grpc

# The one table from a domain error's kind (what the stores and run managers raise, with no gRPC in them)
# to its gRPC status and the HTTP status the labeling page answers.
STATUS: dict[str, tuple[grpc.StatusCode, int]] = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, 400),  # the message names the field
    "unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, 401),
    "not_found": (grpc.StatusCode.NOT_FOUND, 404),
    "conflict": (grpc.StatusCode.ALREADY_EXISTS, 409),  # e.g. a run id reused for a different request
    "precondition": (grpc.StatusCode.FAILED_PRECONDITION, 409),  # e.g. no model loaded
    "exhausted": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),  # a queue is full
    "unavailable": (grpc.StatusCode.UNAVAILABLE, 503),
}
INTERNAL = (grpc.StatusCode.INTERNAL, 500)


def http_status(kind: str) -> int:
    """The HTTP status of a domain error kind (500 for a kind the table lacks)."""
    return STATUS.get(kind, INTERNAL)[1]


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def domain_error(kind: str, message: str) -> ServiceError:
    """A domain error (kind from :data:`STATUS`, message already naming the field) as a gRPC status."""
    return ServiceError(STATUS.get(kind, INTERNAL)[0], message)


def invalid(field: str, why: str) -> ServiceError:
    """INVALID_ARGUMENT naming the field, e.g. invalid("sampling.top_p", "must be in (0, 1], got 2")."""
    return domain_error("invalid", f"{field}: {why}")


def not_found(what: str) -> ServiceError:
    return domain_error("not_found", what)


def precondition(why: str) -> ServiceError:
    return domain_error("precondition", why)


def exhausted(why: str) -> ServiceError:
    return domain_error("exhausted", why)


def already_exists(why: str) -> ServiceError:
    return domain_error("conflict", why)


def clip(value: object, n: int = 160) -> str:
    """A caller's value for a message or a log line: repr'd and cut to ``n`` characters (a 200,000-character
    path must not come back whole, nor fill the log)."""
    r = repr(value)
    return r if len(r) <= n else f"{r[:n]}… ({len(r)} characters)"


def require(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise invalid(field, why)


def check_range(value: float, lo: float, hi: float, field: str, lo_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(field, f"must be a finite number, got {value}")
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise invalid(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")


def check_token_ids(ids: Sequence[int], vocab_size: int, field: str, allow_empty: bool = False,
                    max_len: int | None = None) -> list[int]:
    """``ids`` (a repeated proto field, or any sized sequence) as a list, after its count is checked
    against ``max_len`` — before anything is copied — and every id against the vocabulary (min/max run in C;
    the offending index is searched only on failure)."""
    n = len(ids)
    if max_len is not None and n > max_len:
        raise invalid(field, f"{n} ids exceed the limit of {max_len}")
    if not n and not allow_empty:
        raise invalid(field, "must not be empty")
    out = list(ids)
    if out and (min(out) < 0 or max(out) >= vocab_size):
        i, t = next((i, t) for i, t in enumerate(out) if t < 0 or t >= vocab_size)
        raise invalid(f"{field}[{i}]", f"token id {t} out of range [0, {vocab_size})")
    return out
