"""A generation engine with continuous (dynamic) batching over a KV cache — no gRPC in here.

One background *decode thread* owns the model. Submitters only append to a bounded queue and wait on a
handle (a future, or a token stream). Between decode steps the thread

1. applies a pending weight swap if the running batch has drained,
2. admits queued requests (up to ``max_batch_size`` rows): their prompts are prefilled together and
   the resulting cache is joined to the running one with :meth:`KVCache.merge`,
3. samples one token for every active row in one batched call (:func:`sample_rows`; each row keeps
   its own :class:`RowSampler` RNG, so a seeded sample is the same alone or batched with others),
4. lets finished rows leave (:meth:`KVCache.select`) and runs one decode step for the rest.

A request (one or more prompts × ``n`` samples) is served entirely by one model version: its rows are
pinned to the model that was active when its first row was admitted. ``update_weights`` stages a new
model; from then on no *new* request joins the old batch, the old batch drains on the old weights (the
old model object stays alive for it), then the new model becomes active and queued requests are
admitted on it. Every result says which version produced it.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import torch

from chatrl.services.core.build import architecture
from chatrl.services.core.generate import RowSampler, SamplingParams, decode_step, prefill, sample_rows
from chatrl.services.core.model import KVCache, autocast

log = logging.getLogger("chatrl.policy.engine")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


# --- errors -------------------------------------------------------------------------------------------

class EngineError(Exception):
    """Base class of the errors the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """The request itself is malformed (empty prompt, token id out of range, bad params, ...)."""


class QueueFull(EngineError):
    """``max_queue`` requests are already waiting: back off (the server answers RESOURCE_EXHAUSTED)."""


class RequestTooLarge(EngineError):
    """A request asks for more rows (prompts × n) than the engine serves in one request."""


class NotLoaded(EngineError):
    """No model is loaded yet."""


class VersionMismatch(EngineError):
    """The request insisted on a model version that is not the one that would serve it."""


class StaleVersion(EngineError, ValueError):
    """``update_weights`` got a version that is not greater than the latest one."""


class EngineClosed(EngineError):
    """The engine is shutting down or shut down."""


class RequestCancelled(EngineError):
    """The request was cancelled (client went away, deadline passed) before it finished."""


# --- results ------------------------------------------------------------------------------------------

@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log p(token | prefix) under softmax(logits / T) (T = 1 when greedy)
    text: str  # decoded without special tokens, cut before a matched stop string
    finish_reason: str  # "stop" (end/stop token or stop string) | "length"
    model_version: int


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    completions: list[list[Completion]]  # [prompt][sample]
    model_version: int

    @property
    def samples(self) -> list[Completion]:
        """The n samples of the first (for ``submit``: the only) prompt."""
        return self.completions[0]


@dataclass
class StreamDelta:
    token_ids: list[int]
    logprobs: list[float]
    text: str  # may be empty (incomplete UTF-8 character, or text that may start a stop string)
    model_version: int


@dataclass
class StreamEnd:
    completion: Completion
    prompt_ids: list[int]
    model_version: int


@dataclass
class StepInfo:
    """Passed to ``on_step`` after every engine iteration (from the decode thread)."""
    batch_size: int  # rows that got a token this iteration
    admitted: int  # rows that joined this iteration
    finished: int  # rows that left this iteration
    forward_passes: int  # forward passes this iteration (prefill + decode)
    queue_depth: int
    model_version: int


@dataclass
class EngineStats:
    forward_passes: int = 0
    prefill_passes: int = 0
    decode_passes: int = 0
    tokens_generated: int = 0
    rows_admitted: int = 0
    requests_submitted: int = 0
    requests_completed: int = 0
    requests_cancelled: int = 0  # cancellations asked for (client gone, deadline, shutdown)
    requests_failed: int = 0
    requests_rejected: int = 0
    weight_swaps: int = 0
    queue_depth: int = 0
    active_rows: int = 0
    max_batch_size_seen: int = 0
    model_version: int = 0
    # number of sampling steps that ran at each batch size
    batch_size_hist: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        n = sum(self.batch_size_hist.values())
        return sum(b * c for b, c in self.batch_size_hist.items()) / n if n else 0.0


@dataclass
class ModelSlot:
    """A model with its version and metadata (what GetModelInfo reports)."""
    model: torch.nn.Module
    version: int
    tokenizer: object | None = None
    meta: dict = field(default_factory=dict)  # e.g. checkpoint_uri, weights_sha256, name
    loaded_at: float = field(default_factory=time.time)
    owned: bool = False  # built by the engine from a state dict: reusable for a later update once retired


# --- internal request / row state ------------------------------------------------------------------------

class _Row:
    __slots__ = ("req", "p", "j", "prompt", "params", "sampler", "tokens", "logprobs", "max_new",
                 "stop_ids", "finish", "text")

    def __init__(self, req: _Request, p: int, j: int, prompt: list[int], params: SamplingParams,
                 max_new: int, stop_ids: frozenset[int]) -> None:
        self.req, self.p, self.j, self.prompt, self.params = req, p, j, prompt, params
        self.sampler: RowSampler | None = None  # created on admission (seeding costs a little)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.max_new = max_new
        self.stop_ids = stop_ids
        self.finish = ""
        self.text: str | None = None


class _Request:
    def __init__(self, prompts: list[list[int]], n: int, stop: tuple[str, ...], expected_version: int | None,
                 stream: TokenStream | None) -> None:
        self.prompts = prompts
        self.n = n
        self.stop = stop
        self.expected_version = expected_version
        self.stream = stream
        self.future: Future = Future()
        self.rows: list[_Row] = []
        self.next_row = 0  # rows[:next_row] have been admitted
        self.rows_done = 0
        self.slot: ModelSlot | None = None  # pinned at first admission
        self.cancel_reason: EngineError | None = None
        self.resolved = False
        self.submitted_at = time.monotonic()

    @property
    def pending_rows(self) -> int:
        return len(self.rows) - self.next_row


# --- handles --------------------------------------------------------------------------------------------

class GenerationHandle:
    """What ``submit`` returns: wait with :meth:`result`, give up with :meth:`cancel`."""

    def __init__(self, engine: GenerationEngine, req: _Request) -> None:
        self._engine, self._req = engine, req

    def result(self, timeout: float | None = None) -> GenerationResult:
        try:
            return self._req.future.result(timeout)
        except FutureTimeout:
            raise TimeoutError("generation did not finish in time") from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._req.future.exception(timeout)

    def done(self) -> bool:
        return self._req.future.done()

    def add_done_callback(self, fn: Callable[[GenerationHandle], None]) -> None:
        self._req.future.add_done_callback(lambda _f: fn(self))

    def cancel(self) -> None:
        """Drop the request's rows (queued or running); ``result`` then raises RequestCancelled."""
        self._engine._cancel(self._req, RequestCancelled("request cancelled"))

    @property
    def model_version(self) -> int | None:
        """The version serving this request, once admitted."""
        return self._req.slot.version if self._req.slot is not None else None


_DONE = object()


class TokenStream:
    """Iterate to receive :class:`StreamDelta` objects as tokens are produced, then one :class:`StreamEnd`.

    Text deltas hold back an incomplete UTF-8 character and any tail that could be the beginning of a
    stop string, so the concatenated delta texts equal the final completion text. Closing the iterator
    early (or calling :meth:`cancel`) drops the request."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._items: deque = deque()
        self._cv = threading.Condition()
        self._handle: GenerationHandle | None = None
        self._tokens: list[int] = []
        self._emitted = ""
        self._finished = False
        self._end: StreamEnd | None = None

    # called from the decode thread
    def _push(self, item) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify()

    @property
    def model_version(self) -> int | None:
        return self._handle.model_version if self._handle else None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def close(self) -> None:
        if not self._finished:
            self.cancel()
        self._finished = True

    def __iter__(self) -> Iterator[StreamDelta | StreamEnd]:
        return self

    def _safe_text(self) -> str:
        if self._tok is None:
            return ""
        text = self._tok.decode(self._tokens)
        for s in self._stop:  # the decode thread is about to end the stream there
            k = text.find(s)
            if k >= 0:
                text = text[:k]
        cut = len(text)
        while cut and text[cut - 1] == "\ufffd":  # maybe an incomplete multi-byte character
            cut -= 1
        hold = 0
        for s in self._stop:  # a tail that could grow into a stop string
            for k in range(min(len(s) - 1, cut), 0, -1):
                if text[cut - k:cut] == s[:k]:
                    hold = max(hold, k)
                    break
        return text[:cut - hold]

    def __next__(self) -> StreamDelta | StreamEnd:
        if self._finished:
            raise StopIteration
        if self._end is not None:  # the end, held back behind the final delta
            end, self._end = self._end, None
            self._finished = True
            return end
        with self._cv:
            while not self._items:
                self._cv.wait()
            batch = list(self._items)
            self._items.clear()
        toks: list[int] = []
        lps: list[float] = []
        version = 0
        for item in batch:
            if isinstance(item, BaseException):
                self._finished = True
                raise item
            if isinstance(item, StreamEnd):
                self._tokens += toks
                final = item.completion.text
                text = final[len(self._emitted):] if final.startswith(self._emitted) else ""
                if not toks and not text:
                    self._finished = True
                    return item
                self._emitted += text
                self._end = item
                return StreamDelta(toks, lps, text, item.model_version)
            tok, lp, version = item
            toks.append(tok)
            lps.append(lp)
        self._tokens += toks
        safe = self._safe_text()
        text = safe[len(self._emitted):] if len(safe) > len(self._emitted) else ""
        self._emitted += text
        return StreamDelta(toks, lps, text, version)

    def __del__(self) -> None:  # an abandoned stream frees its rows
        try:
            if not self._finished:
                self.cancel()
        except Exception:
            pass


# --- the engine -----------------------------------------------------------------------------------------

def load_state_into(template: torch.nn.Module, state: dict[str, torch.Tensor], device: str,
                    into: torch.nn.Module | None = None) -> torch.nn.Module:
    """A model shaped like ``template`` holding ``state`` (copied: ``state`` may be views of a buffer the
    caller reuses); strict about names and shapes (tied / absent heads allowed). ``into``, a retired model
    of the same architecture, is overwritten instead of copying ``template`` (no fresh allocation).

    Tensors of ``state`` that *are* the template's own (a LoRA adapter push: the new adapter plus the base
    this replica holds) are shared, not copied: the new model costs the adapter's bytes, not another copy of
    the base. Models that share weights are marked and never overwritten in place as ``into``."""
    own = template.state_dict()
    shared = {k for k, t in state.items() if k in own and torch.is_tensor(t) and t.data_ptr() == own[k].data_ptr()
              and t.dtype == own[k].dtype and t.shape == own[k].shape}
    tied = getattr(getattr(template, "cfg", None), "tie_embeddings", False)
    unexpected = sorted(k for k in state if k not in own and not k.startswith("scalar_head."))
    missing = sorted(k for k in own if k not in state and not (tied and k == "lm_head.weight")
                     and not k.startswith("scalar_head."))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in state.items():
        if not torch.is_tensor(t):
            raise ValueError(f"weights[{k!r}] is not a tensor")
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise ValueError(f"weights[{k!r}] has shape {list(t.shape)}, the model expects {list(own[k].shape)}")
        # min and max propagate NaN and inf, and cost ~20x less than a full isfinite mask
        if (k not in shared and t.is_floating_point() and t.numel()
                and not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())):
            raise ValueError(f"weights[{k!r}] contains NaN or inf")
    if shared:
        params = template.state_dict(keep_vars=True)
        model = copy.deepcopy(template, {id(params[k]): params[k] for k in shared})  # the memo: kept, not copied
        model._chatrl_shares_weights = template._chatrl_shares_weights = True
        model.load_state_dict({k: v for k, v in state.items() if k in own and k not in shared}, strict=False)
        return model.to(device).eval()
    if into is not None:
        mine = into.state_dict()
        if getattr(into, "_chatrl_shares_weights", False) or type(into) is not type(template) or (
                mine.keys() != own.keys()) or any(mine[k].shape != own[k].shape or mine[k].dtype != own[k].dtype
                                                  for k in own):
            into = None
    if into is None:
        into = copy.deepcopy(template)
        into._chatrl_shares_weights = False  # a copy of everything: its own weights
    model = into
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.to(device).eval()


class GenerationEngine:
    def __init__(self, model: torch.nn.Module | None, tokenizer=None, *, version: int = 1, device: str = "cpu",
                 dtype: str | None = None, max_batch_size: int = 32, max_queue: int = 256,
                 max_new_tokens_limit: int | None = None, max_request_rows: int = 1024,
                 end_token_ids: Sequence[int] | None = None, pad_id: int | None = None,
                 meta: dict | None = None, on_step: Callable[[StepInfo], None] | None = None,
                 name: str = "policy-engine") -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        autocast(dtype, device.split(":")[0])  # refuses fp16 on CPU / unknown dtypes now, not mid-request
        self.device, self.dtype = device, dtype
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_request_rows = max(max_request_rows, max_batch_size)
        self._limit = max_new_tokens_limit
        self._end_ids = end_token_ids
        self._pad_id = pad_id
        self.on_step = on_step

        self._cv = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._partial: deque[_Request] = deque()  # admitted requests with rows still waiting for room
        self._active: ModelSlot | None = None
        self._pending: ModelSlot | None = None
        self._closed = False
        self._stop = False
        self._paused = False
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._swapped = threading.Condition(self._cv)
        if model is not None:
            if version < 1:
                raise ValueError("version must be >= 1 for a loaded model")
            self._active = ModelSlot(self._serving(model), version, tokenizer, dict(meta or {}))
            self._stats.model_version = version
        self._tokenizer = tokenizer
        # decode-thread state
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._spare: torch.nn.Module | None = None  # a retired model the next weight update is copied into
        self._logits: torch.Tensor | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- public properties ------------------------------------------------------------------------------
    @property
    def latest(self) -> ModelSlot | None:
        """The model a request submitted now will be served by (pending swap, else active)."""
        with self._cv:
            return self._pending or self._active

    @property
    def version(self) -> int:
        s = self.latest
        return s.version if s else 0

    @property
    def active_version(self) -> int:
        """The version of the model decoding right now (lags ``version`` while an old batch drains)."""
        s = self._active
        return s.version if s else 0

    @property
    def loaded(self) -> bool:
        return self.latest is not None

    @property
    def tokenizer(self):
        s = self.latest
        return s.tokenizer if s is not None and s.tokenizer is not None else self._tokenizer

    @property
    def max_seq_len(self) -> int | None:
        s = self.latest
        return _max_seq_len(s.model) if s else None

    @property
    def max_new_tokens_limit(self) -> int:
        msl = self.max_seq_len or 1 << 20
        return min(self._limit, msl) if self._limit else msl

    @property
    def stats(self) -> EngineStats:
        with self._stats_lock:
            s = replace(self._stats, batch_size_hist=dict(self._stats.batch_size_hist))
        s.queue_depth = len(self._queue)
        return s

    # --- submission -------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, n: int = 1, *,
               stop: Sequence[str] = (), expected_version: int | None = None) -> GenerationHandle:
        """Queue n samples of one prompt; ``handle.result().samples`` are the n completions."""
        return self.submit_batch([prompt_ids], params, n, stop=stop, expected_version=expected_version)

    def submit_batch(self, prompts: Sequence[Sequence[int]], params: SamplingParams, n: int = 1, *,
                     stop: Sequence[str] = (), expected_version: int | None = None) -> GenerationHandle:
        """Queue n samples of each prompt as one request (served by one model version)."""
        req = self._make_request(prompts, params, n, stop, expected_version, None)
        return self._enqueue(req)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, *, stop: Sequence[str] = (),
               expected_version: int | None = None) -> TokenStream:
        """Queue one sample and return an iterator of its tokens as they are produced."""
        ts = TokenStream(self.tokenizer, tuple(stop))
        req = self._make_request([prompt_ids], params, 1, stop, expected_version, ts)
        ts._handle = self._enqueue(req)
        return ts

    def _make_request(self, prompts, params: SamplingParams, n: int, stop, expected_version, stream) -> _Request:
        slot = self.latest
        if slot is None:
            raise NotLoaded("no model is loaded")
        if not prompts:
            raise InvalidRequest("prompts must not be empty")
        if not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"n must be >= 1, got {n}")
        rows = len(prompts) * n
        if rows > self.max_request_rows:
            raise RequestTooLarge(f"{len(prompts)} prompts x n={n} = {rows} samples exceeds the limit of "
                                  f"{self.max_request_rows} per request")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequest("stop strings must be non-empty strings")
        if stop and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer")
        limit = self.max_new_tokens_limit
        try:
            params.validate(limit)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        if expected_version and expected_version != slot.version:
            raise VersionMismatch(f"expected model version {expected_version}, serving {slot.version}")
        vocab = _vocab_size(slot.model)
        msl = _max_seq_len(slot.model)
        tok = self.tokenizer
        end_ids = set(self._end_ids if self._end_ids is not None else _default_end_ids(tok))
        stop_ids = frozenset(end_ids | set(params.stop_token_ids))
        clean: list[list[int]] = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise InvalidRequest(f"prompts[{i}] must not be empty")
            bad = next((t for t in p if t < 0 or (vocab is not None and t >= vocab)), None)
            if bad is not None:
                raise InvalidRequest(f"prompts[{i}]: token id {bad} out of range [0, {vocab})")
            if msl is not None and len(p) >= msl:
                raise InvalidRequest(f"prompts[{i}] has {len(p)} tokens; the model's max_seq_len is {msl}")
            clean.append(p)
        req = _Request(clean, n, stop, expected_version or None, stream)
        for i, p in enumerate(clean):
            room = (msl - len(p)) if msl is not None else params.max_new_tokens
            for j in range(n):
                rp = params if params.seed is None else replace(params, seed=int(params.seed) + j)
                req.rows.append(_Row(req, i, j, p, rp, min(params.max_new_tokens, room), stop_ids))
        return req

    def _enqueue(self, req: _Request) -> GenerationHandle:
        with self._cv:
            if self._closed:
                raise EngineClosed("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                with self._stats_lock:
                    self._stats.requests_rejected += 1
                raise QueueFull(f"generation queue is full ({self.max_queue} requests waiting)")
            self._queue.append(req)
            with self._stats_lock:
                self._stats.requests_submitted += 1
            self._cv.notify_all()
        return GenerationHandle(self, req)

    def _cancel(self, req: _Request, reason: EngineError) -> None:
        with self._cv:
            if req.resolved or req.cancel_reason is not None:
                return
            req.cancel_reason = reason
            with self._stats_lock:
                self._stats.requests_cancelled += 1
            if req.slot is None:  # still queued: resolve now
                try:
                    self._queue.remove(req)
                except ValueError:
                    pass
                self._resolve_error(req, reason)
            self._cv.notify_all()

    # --- weights ----------------------------------------------------------------------------------------
    def update_weights(self, weights: dict[str, torch.Tensor] | torch.nn.Module, version: int, *,
                       tokenizer=None, meta: dict | None = None, wait: bool = False,
                       timeout: float | None = None) -> int:
        """Stage new weights (a state dict for the current architecture, or a whole model) as ``version``.

        Requests admitted from now on run on them; requests already running finish on the old weights.
        Returns the previous latest version. Raises StaleVersion unless ``version`` is greater than the
        latest one, ValueError if the weights do not fit the model. With ``wait`` it blocks until the new
        model is the active one."""
        version = int(version)
        owned = not isinstance(weights, torch.nn.Module)
        if not owned:
            model = self._serving(weights)
        else:
            template = self.latest
            if template is None:
                raise NotLoaded("no model loaded to take a state dict; pass a model")
            self._check_version(version)  # fail fast before the copy
            with self._cv:
                spare, self._spare = self._spare, None
            model = load_state_into(template.model, weights, self.device, into=spare)
        with self._cv:
            self._check_version(version)
            cur = self._pending or self._active
            prev = cur.version if cur else 0
            tok = tokenizer
            if cur is not None and cur.tokenizer is not None:
                if tokenizer is not None and tokenizer.to_str() != cur.tokenizer.to_str():
                    raise ValueError("a weight update cannot change the tokenizer")
                tok = cur.tokenizer
            elif tok is None:
                tok = self._tokenizer
            if self._pending is not None and self._pending.owned:
                self._spare = self._pending.model  # staged but never served: reusable
            self._pending = ModelSlot(model, version, tok, dict(meta or {}), owned=owned)
            self._cv.notify_all()
            if wait:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self.active_version < version:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"version {version} not active after {timeout}s")
                    self._swapped.wait(left)
        return prev

    def _serving(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the engine's device, in eval mode; a Hugging Face model also with its weights in the
        engine's dtype (bf16: half the bytes each decode step reads, half the memory), as ModelHost loads
        them. chatrl's GPT keeps fp32 weights and runs under autocast."""
        model = model.to(self.device).eval()
        cfg = getattr(model, "cfg", None)
        if cfg is not None and architecture(cfg.to_dict()) == "hf" and self.dtype in ("bf16", "fp16"):
            model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype])
        return model

    def _check_version(self, version: int) -> None:
        with self._cv:
            cur = self._pending or self._active
            if cur is not None and version <= cur.version:
                raise StaleVersion(f"version {version} must be greater than the current version {cur.version}")
            if version < 1:
                raise StaleVersion(f"version must be >= 1, got {version}")

    # --- lifecycle ----------------------------------------------------------------------------------------
    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop the engine. ``drain``: finish queued and running requests first; else cancel them."""
        with self._cv:
            self._closed = True
            self._paused = False
            if not drain:
                err = EngineClosed("the engine shut down")
                doomed = list(self._queue) + [x.req for x in self._rows] + list(self._partial)
                self._queue.clear()
                for r in {id(r): r for r in doomed}.values():
                    if r.cancel_reason is None and not r.resolved:
                        r.cancel_reason = err
                        with self._stats_lock:
                            self._stats.requests_cancelled += 1
                    if r.slot is None:
                        self._resolve_error(r, err)
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def pause(self) -> None:
        """Stop admitting queued requests (running ones continue); requests still queue up."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- the decode thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._has_work():
                        self._cv.wait()
                    if self._stop and not (self._queue or self._rows or self._partial):
                        return
                    admit = self._admit_locked()
                    depth = len(self._queue)
                try:
                    self._step(admit, depth)
                except Exception as e:  # never let the decode thread die: fail the batch, carry on
                    log.exception("decode step failed; failing %d running rows", len(self._rows) + len(admit))
                    err = EngineError(f"generation failed: {type(e).__name__}: {e}")
                    with self._cv:
                        reqs = {id(r.req): r.req for r in self._rows + admit}
                        reqs.update({id(r): r for r in self._partial})
                        self._partial.clear()
                        for r in reqs.values():
                            self._resolve_error(r, err, failed=True)
                    self._rows, self._cache, self._logits = [], None, None

    def _has_work(self) -> bool:
        return bool(self._rows or self._partial or self._stop or (self._queue and not self._paused)
                    or (self._pending is not None and not self._rows))

    def _admit_locked(self) -> list[_Row]:
        # a staged model becomes active once the old batch has drained
        if self._pending is not None and not self._rows and not self._partial:
            retired, (self._active, self._pending) = self._active, (self._pending, None)
            if retired is not None and retired.owned:
                self._spare = retired.model  # nothing runs on it any more: the next update overwrites it
            with self._stats_lock:
                self._stats.weight_swaps += 1
                self._stats.model_version = self._active.version
            log.info("model version %d active", self._active.version)
            self._swapped.notify_all()
        free = self.max_batch_size - len(self._rows)
        admit: list[_Row] = []
        while free > 0 and self._partial:
            req = self._partial[0]
            if req.cancel_reason is not None:
                self._partial.popleft()
                self._resolve_error(req, req.cancel_reason)
                continue
            take = min(free, req.pending_rows)
            admit += req.rows[req.next_row:req.next_row + take]
            req.next_row += take
            free -= take
            if not req.pending_rows:
                self._partial.popleft()
        while free > 0 and self._queue and self._pending is None and self._active is not None and not self._paused:
            req = self._queue.popleft()
            if req.cancel_reason is not None:
                continue
            slot = self._active
            if req.expected_version and req.expected_version != slot.version:
                self._resolve_error(req, VersionMismatch(
                    f"expected model version {req.expected_version}, serving {slot.version}"), failed=True)
                continue
            req.slot = slot
            take = min(free, req.pending_rows)
            admit += req.rows[:take]
            req.next_row = take
            free -= take
            if req.pending_rows:
                self._partial.append(req)
        return admit

    def _step(self, admit: list[_Row], depth: int) -> None:
        slot = self._active
        passes = 0
        # rows of cancelled requests leave first
        if self._rows and any(r.req.cancel_reason is not None for r in self._rows):
            keep = [i for i, r in enumerate(self._rows) if r.req.cancel_reason is None]
            self._finish_cancelled([r for r in self._rows if r.req.cancel_reason is not None])
            self._select(keep)
        admit_live = [r for r in admit if r.req.cancel_reason is None]
        self._finish_cancelled([r for r in admit if r.req.cancel_reason is not None])
        if admit_live:
            model = slot.model
            pad = self._pad_id if self._pad_id is not None else _default_pad(slot.tokenizer)
            logits, cache = prefill(model, [r.prompt for r in admit_live], pad, self.dtype, self.device)
            passes += 1
            for r in admit_live:
                r.sampler = RowSampler(r.params)
            if self._cache is None:
                self._cache, self._logits = cache, logits
            else:
                self._cache = KVCache.merge(self._cache, cache)
                self._logits = torch.cat([self._logits, logits])
            self._rows += admit_live
        if not self._rows:
            with self._stats_lock:
                self._stats.active_rows = 0
            self._notify_step(StepInfo(0, 0, 0, 0, depth, slot.version if slot else 0))
            return
        toks, lps = sample_rows(self._logits, [row.sampler for row in self._rows])
        keep: list[int] = []
        nxt: list[int] = []
        done: list[_Row] = []
        for i, row in enumerate(self._rows):
            tok, lp = toks[i], lps[i]
            row.tokens.append(tok)
            row.logprobs.append(lp)
            if row.req.stream is not None:
                row.req.stream._push((tok, lp, slot.version))
            if tok in row.stop_ids:
                row.finish = FINISH_STOP
            elif row.req.stop and self._hit_stop_string(row, slot):
                row.finish = FINISH_STOP
            elif len(row.tokens) >= row.max_new:
                row.finish = FINISH_LENGTH
            if row.finish:
                done.append(row)
            else:
                keep.append(i)
                nxt.append(tok)
        batch = len(self._rows)
        if len(keep) < batch:
            self._select(keep)
        with self._stats_lock:  # before results are handed out: a caller woken by one sees this step counted
            st = self._stats
            st.forward_passes += passes
            st.prefill_passes += 1 if admit_live else 0
            st.tokens_generated += batch
            st.rows_admitted += len(admit_live)
            st.batch_size_hist[batch] = st.batch_size_hist.get(batch, 0) + 1
            st.max_batch_size_seen = max(st.max_batch_size_seen, batch)
            st.active_rows = len(self._rows)
        for row in done:
            self._row_done(row, slot)
        if self._rows:
            self._logits, self._cache = decode_step(slot.model, nxt, self._cache, self.dtype, self.device)
            passes += 1
            with self._stats_lock:
                self._stats.forward_passes += 1
                self._stats.decode_passes += 1
        self._notify_step(StepInfo(batch, len(admit_live), len(done), passes, depth, slot.version))

    def _notify_step(self, info: StepInfo) -> None:
        if self.on_step is not None:
            try:
                self.on_step(info)
            except Exception:
                log.exception("on_step callback failed")

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._logits = [], None, None
            return
        self._rows = [self._rows[i] for i in keep]
        self._cache = self._cache.select(keep)
        self._logits = self._logits[torch.as_tensor(keep, device=self._logits.device)]

    def _hit_stop_string(self, row: _Row, slot: ModelSlot) -> bool:
        stops = row.req.stop
        # Decode only the newest tokens each step (this runs in the decode thread for every row): a stop
        # string completed by this step lies within them — every token is at least one byte, a character
        # at most four — and any earlier one was caught at its own step. The whole text is decoded on a hit.
        tail = slot.tokenizer.decode(row.tokens[-(4 * max(len(s) for s in stops) + 4):])
        if not any(s in tail for s in stops):
            return False
        text = slot.tokenizer.decode(row.tokens)
        hits = [k for k in (text.find(s) for s in stops) if k >= 0]
        if not hits:
            return False
        row.text = text[:min(hits)]
        return True

    def _row_done(self, row: _Row, slot: ModelSlot) -> None:
        req = row.req
        if row.text is None:
            tok = slot.tokenizer
            row.text = tok.decode(row.tokens) if tok is not None else ""
        req.rows_done += 1
        if req.rows_done < len(req.rows):
            return
        comps: list[list[Completion]] = [[] for _ in req.prompts]
        for r in req.rows:
            comps[r.p].append(Completion(r.tokens, r.logprobs, r.text or "", r.finish, slot.version))
        result = GenerationResult(req.prompts, comps, slot.version)
        with self._cv:
            if req.resolved:
                return
            req.resolved = True
        with self._stats_lock:
            self._stats.requests_completed += 1
        if req.stream is not None:
            req.stream._push(StreamEnd(comps[0][0], req.prompts[0], slot.version))
        req.future.set_result(result)

    def _finish_cancelled(self, rows: list[_Row]) -> None:
        with self._cv:
            for r in rows:
                self._resolve_error(r.req, r.req.cancel_reason or RequestCancelled("request cancelled"))

    def _resolve_error(self, req: _Request, err: EngineError, failed: bool = False) -> None:
        """Resolve a request with an error (call with ``self._cv`` held)."""
        if req.resolved:
            return
        req.resolved = True
        if req.cancel_reason is None:
            req.cancel_reason = err
        if failed:
            with self._stats_lock:
                self._stats.requests_failed += 1
        if req.stream is not None:
            req.stream._push(err)
        req.future.set_exception(err)


def _vocab_size(model) -> int | None:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if v else None


def _max_seq_len(model) -> int | None:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if v:
            return int(v)
    return None


def _default_end_ids(tok) -> set[int]:
    if tok is None:
        return set()
    return {i for i in (getattr(tok, "end_id", None), getattr(tok, "eot_id", None)) if i is not None}


def _default_pad(tok) -> int:
    p = getattr(tok, "pad_id", None) if tok is not None else None
    return int(p) if p is not None else 0
