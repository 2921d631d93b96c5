"""Errors a service raises on purpose; the server interceptor maps them to gRPC status codes.

Anything else escaping a handler is logged with its traceback and answered ``INTERNAL`` with a
generic message: a client never sees a traceback, and the server keeps serving."""

from __future__ import annotations

import math
from collections.abc import Iterable

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, why: str) -> ServiceError:
    """INVALID_ARGUMENT naming the field, e.g. invalid("sampling.top_p", "must be in (0, 1], got 2")."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {why}")


def not_found(what: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, what)


def precondition(why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, why)


def exhausted(why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)


def already_exists(why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, why)


def require(cond: bool, field: str, why: str) -> None:
    if not cond:
        raise invalid(field, why)


def check_range(value: float, lo: float, hi: float, field: str, lo_open: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(field, f"must be a finite number, got {value}")
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise invalid(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")


def check_token_ids(ids: Iterable[int], vocab_size: int, field: str, allow_empty: bool = False) -> list[int]:
    ids = list(ids)
    if not ids and not allow_empty:
        raise invalid(field, "must not be empty")
    for i, t in enumerate(ids):
        if t < 0 or t >= vocab_size:
            raise invalid(f"{field}[{i}]", f"token id {t} out of range [0, {vocab_size})")
    return ids
