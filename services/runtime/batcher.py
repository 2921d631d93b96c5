"""Micro-batching of concurrent requests: items from many RPCs are run through the model together.

A single worker thread takes up to ``max_batch`` queued items (waiting at most ``max_wait_s`` for more
after the first arrives) whose ``cost`` (e.g. tokens) sums to at most ``max_cost`` — a first item always
goes, and the one that does not fit opens the next batch — runs ``fn(items) -> results`` once, and hands
each caller its results. The
queue is bounded: when full, ``submit`` fails at once with RESOURCE_EXHAUSTED (backpressure, not OOM)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from chatrl.services.runtime.errors import exhausted


class MicroBatcher:
    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 64, max_wait_s: float = 0.005,
                 max_queue: int = 1024, name: str = "batcher", cost: Callable[[Any], int] | None = None,
                 max_cost: int = 0) -> None:
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.cost, self.max_cost = cost, max_cost
        self._carry: tuple | None = None  # the item that did not fit the last batch: first in the next
        self.q: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batches = 0
        self.last_batch_size = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name=name, daemon=True)
        self._t.start()

    def depth(self) -> int:
        return self.q.qsize()

    def submit(self, items: list[Any]) -> list[Any]:
        """Run ``items`` (one request's) through the batched function; blocks until done."""
        futs = []
        for it in items:
            f: Future = Future()
            try:
                self.q.put_nowait((it, f))
            except queue.Full:
                for g in futs:
                    g.cancel()
                raise exhausted(f"queue full ({self.q.maxsize} items waiting); retry later") from None
            futs.append(f)
        return [f.result() for f in futs]

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                try:
                    first = self.q.get(timeout=0.1)
                except queue.Empty:
                    continue
            batch = [first]
            spent = self.cost(first[0]) if self.cost else 0
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if self.cost and self.max_cost:
                    c = self.cost(nxt[0])
                    if spent + c > self.max_cost:
                        self._carry = nxt
                        break
                    spent += c
                batch.append(nxt)
            batch = [(it, f) for it, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.fn([it for it, _ in batch])
                for (_, f), r in zip(batch, results):
                    f.set_result(r)
            except BaseException as e:  # the callers see the error; the worker lives on
                for _, f in batch:
                    f.set_exception(e)
            self.batches += 1
            self.last_batch_size = len(batch)

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
