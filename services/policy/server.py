"""policy-inference service: thin gRPC glue over :class:`chatrl.services.policy.engine.GenerationEngine`.

``Generate`` / ``GenerateStream`` validate every field (``INVALID_ARGUMENT`` naming it), turn prompts
(text, token ids or a chat rendered with the chat template) into token ids and hand them to the
continuously batching engine; ``UpdateWeights`` receives a safetensors payload in chunks, checks
offsets, size and SHA-256, parses it without pickle and stages it in the engine (requests already
running finish on the old version); ``GetModelInfo`` describes the latest model.

Run it: ``python -m chatrl.services.policy --checkpoint runs/tiny/checkpoints/sft --port 50051`` (or
``chatrl serve policy``). Without a checkpoint the service starts NOT_SERVING and takes its first model
from ``UpdateWeights`` (metadata ``config_json`` — the GPT config — and ``tokenizer_json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge, Histogram

from chatrl.services.core.generate import SamplingParams
from chatrl.services.core.model import resolve_dtype
from chatrl.services.core.tokenizer import ChatTokenizer
from chatrl.services.policy.engine import (
    FINISH_STOP,
    Completion,
    EngineClosed,
    EngineError,
    GenerationEngine,
    InvalidRequest,
    NotLoaded,
    QueueFull,
    RequestCancelled,
    RequestTooLarge,
    StaleVersion,
    StepInfo,
    StreamEnd,
    VersionMismatch,
    load_state_into,
)
from chatrl.services.proto.chatrl.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from chatrl.services.proto.codecs import WeightsFormatError, unpack_state
from chatrl.services.proto.codecs import tensor_to_proto as to_proto
from chatrl.services.proto.enums import FINISH_REASON, ROLE
from chatrl.services.runtime.errors import (
    ServiceError,
    check_token_ids,
    clip,
    exhausted,
    invalid,
    precondition,
    require,
)
from chatrl.services.runtime.logs import event
from chatrl.services.runtime.main import run_service
from chatrl.services.runtime.model_host import ModelHost, model_info
from chatrl.services.runtime.server import ServerConfig, ServiceServer

log = logging.getLogger("chatrl.policy")

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyInferenceService"].full_name
_ROLES = {ROLE.value(r): r for r in ROLE.names}
_FINISH = {FINISH_STOP: FINISH_REASON.value("stop"), "length": FINISH_REASON.value("length")}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DTYPES = {"fp32": None, "float32": None, "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


@dataclass
class PolicyConfig:
    checkpoint: str = ""  # policy checkpoint dir (a stage dir with LATEST works); empty = wait for UpdateWeights
    model_version: int = 1  # version reported for the checkpoint's weights
    name: str = "policy"  # model name reported by GetModelInfo
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU only)
    threads: int = 1  # torch threads of this process
    max_batch_size: int = 32  # sequences decoded together (continuous batching)
    max_queue: int = 256  # requests waiting for the batch; beyond → RESOURCE_EXHAUSTED
    max_new_tokens: int = 256  # upper bound of sampling.max_new_tokens, and the default when it is 0
    max_prompts: int = 256  # prompts per Generate request
    max_n: int = 64  # samples per prompt
    max_request_samples: int = 1024  # prompts × n per Generate request; beyond → RESOURCE_EXHAUSTED
    max_stop_strings: int = 16  # entries of sampling.stop
    max_weights_mb: int = 1024  # largest UpdateWeights payload accepted (its staging buffer: keep below the pod's memory)

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        for f in ("max_batch_size", "max_new_tokens", "max_prompts", "max_n", "max_request_samples",
                  "max_weights_mb", "model_version"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")


class PolicyMetrics:
    def __init__(self, registry, engine_ref) -> None:
        self.tokens = Counter("chatrl_policy_tokens_generated_total", "tokens sampled", registry=registry)
        self.forward = Counter("chatrl_policy_forward_passes_total", "model forward passes (prefill + decode)",
                               registry=registry)
        self.batch = Histogram("chatrl_policy_batch_size", "sequences decoded together per step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self.samples = Counter("chatrl_policy_samples_total", "completions finished, by finish reason",
                               ["finish_reason"], registry=registry)
        self.prompt_tokens = Histogram("chatrl_policy_prompt_tokens", "prompt length in tokens",
                                       buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=registry)
        self.updates = Counter("chatrl_policy_weight_updates_total", "UpdateWeights calls, by outcome",
                               ["outcome"], registry=registry)
        for outcome in ("ok", "rejected"):  # present from the start, so the first increment is a change
            self.updates.labels(outcome)
        self.update_bytes = Counter("chatrl_policy_weight_bytes_received_total", "UpdateWeights payload bytes",
                                    registry=registry)
        self.queue = Gauge("chatrl_policy_queue_depth", "requests waiting to join the batch", registry=registry)
        self.active = Gauge("chatrl_policy_active_sequences", "sequences in the running batch", registry=registry)
        self.version = Gauge("chatrl_policy_model_version", "latest model version (new requests run on it)",
                             registry=registry)
        self.active_version = Gauge("chatrl_policy_active_model_version",
                                    "model version of the running batch", registry=registry)
        self.queue.set_function(lambda: engine_ref().stats.queue_depth)
        self.active.set_function(lambda: engine_ref().stats.active_rows)
        self.version.set_function(lambda: engine_ref().version)
        self.active_version.set_function(lambda: engine_ref().active_version)

    def on_step(self, info: StepInfo) -> None:
        if info.batch_size:
            self.tokens.inc(info.batch_size)
            self.batch.observe(info.batch_size)
        if info.forward_passes:
            self.forward.inc(info.forward_passes)


class PolicyServicer(policy_pb2_grpc.PolicyInferenceServiceServicer):
    def __init__(self, cfg: PolicyConfig, registry, on_loaded=None) -> None:
        self.cfg = cfg
        self.on_loaded = on_loaded
        self._weights_lock = threading.Lock()
        self._staging: bytearray | None = None  # the last upload's buffer, reused by the next of equal size
        self.metrics = PolicyMetrics(registry, lambda: self.engine)
        Gauge("chatrl_policy_weight_staging_bytes", "bytes held for receiving weight uploads",
              registry=registry).set_function(lambda: len(self._staging) if self._staging is not None else 0)
        model = tok = None
        meta: dict = {}
        if cfg.checkpoint:
            host = ModelHost(cfg.name, scalar_head=False, device=cfg.device, dtype=_DTYPES[cfg.dtype])
            loaded = host.load(cfg.checkpoint, version=cfg.model_version)
            model, tok = loaded.model, loaded.tok
            meta = {"checkpoint_uri": loaded.uri, "weights_sha256": loaded.sha256}
        self.engine = GenerationEngine(
            model, tok, version=cfg.model_version, device=cfg.device, dtype=_DTYPES[cfg.dtype],
            max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, max_new_tokens_limit=cfg.max_new_tokens,
            max_request_rows=cfg.max_request_samples, meta=meta, on_step=self.metrics.on_step,
            name="policy-decode")

    def close(self) -> None:
        self.engine.shutdown(drain=False, timeout=10)

    # --- request parsing ------------------------------------------------------------------------------
    def _loaded(self):
        slot = self.engine.latest
        if slot is None:
            raise precondition("no model loaded (start with --checkpoint or push weights with UpdateWeights)")
        return slot

    def _prompt_ids(self, p: common_pb2.Prompt, field: str, tok, vocab: int, msl: int) -> list[int]:
        kind = p.WhichOneof("input")
        if kind is None:
            raise invalid(f"{field}.input", "exactly one of text, token_ids or chat must be set")
        if kind == "token_ids":  # counted before copied: a longer prompt cannot fit the model anyway
            return check_token_ids(p.token_ids.ids, vocab, f"{field}.token_ids.ids", max_len=msl)
        if tok is None:
            raise precondition("the loaded model has no tokenizer: send token_ids prompts")
        if kind == "text":
            require(p.text != "", f"{field}.text", "must not be empty")
            ids = tok.encode(p.text)
            require(bool(ids), f"{field}.text", "encodes to no tokens")
            return ids
        msgs = p.chat.messages
        require(len(msgs) > 0, f"{field}.chat.messages", "must not be empty")
        conv = []
        for j, m in enumerate(msgs):
            role = _ROLES.get(m.role)
            if role is None:
                raise invalid(f"{field}.chat.messages[{j}].role",
                              "must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
            conv.append({"role": role, "content": m.content})
        return tok.render_chat(conv, add_generation_prompt=True)[0]

    def _sampling(self, sp: common_pb2.SamplingParams, vocab: int) -> tuple[SamplingParams, int, list[str], bool]:
        limit = self.engine.max_new_tokens_limit
        mnt = sp.max_new_tokens
        require(0 <= mnt <= limit, "sampling.max_new_tokens", f"must be in [0, {limit}] (0 = default), got {mnt}")
        temp = sp.temperature if sp.HasField("temperature") else 1.0
        require(math.isfinite(temp) and 0.0 <= temp <= 10.0, "sampling.temperature", f"must be in [0, 10], got {temp}")
        require(0 <= sp.top_k <= vocab, "sampling.top_k", f"must be in [0, {vocab}] (0 = off), got {sp.top_k}")
        top_p = sp.top_p if sp.HasField("top_p") else 1.0
        require(math.isfinite(top_p) and 0.0 < top_p <= 1.0, "sampling.top_p", f"must be in (0, 1], got {top_p}")
        n = sp.n or 1
        require(1 <= n <= self.cfg.max_n, "sampling.n", f"must be in [0, {self.cfg.max_n}] (0 = 1), got {sp.n}")
        stop = list(sp.stop)
        require(len(stop) <= self.cfg.max_stop_strings, "sampling.stop",
                f"at most {self.cfg.max_stop_strings} stop strings, got {len(stop)}")
        for i, s in enumerate(stop):
            require(0 < len(s) <= 256, f"sampling.stop[{i}]", "must be 1 to 256 characters")
        params = SamplingParams(max_new_tokens=mnt or limit, temperature=float(temp), top_k=int(sp.top_k),
                                top_p=float(top_p), seed=int(sp.seed) if sp.HasField("seed") else None)
        return params, n, stop, mnt == 0

    def _check_length(self, ids: list[int], params: SamplingParams, default_len: bool, field: str, msl: int) -> None:
        if default_len:  # the server default is capped by the room the prompt leaves
            require(len(ids) < msl, field, f"{len(ids)} tokens leave no room in the model's max_seq_len {msl}")
        else:
            require(len(ids) + params.max_new_tokens <= msl, field,
                    f"{len(ids)} prompt tokens + sampling.max_new_tokens {params.max_new_tokens} exceed the "
                    f"model's max_seq_len {msl}")

    @staticmethod
    def _engine_error(e: EngineError) -> ServiceError:
        if isinstance(e, (QueueFull, RequestTooLarge)):
            return exhausted(str(e))
        if isinstance(e, (NotLoaded, VersionMismatch)):
            return precondition(str(e))
        if isinstance(e, InvalidRequest):
            return invalid("request", str(e))
        if isinstance(e, EngineClosed):
            return ServiceError(grpc.StatusCode.UNAVAILABLE, str(e))
        if isinstance(e, RequestCancelled):
            return ServiceError(grpc.StatusCode.CANCELLED, str(e))
        return ServiceError(grpc.StatusCode.INTERNAL, str(e))

    # --- RPCs -----------------------------------------------------------------------------------------
    def Generate(self, request, context):
        slot = self._loaded()
        tok, vocab, msl = slot.tokenizer, slot.model.cfg.vocab_size, slot.model.cfg.max_seq_len
        ev = request.expected_model_version
        if ev and ev != slot.version:
            raise precondition(f"expected_model_version {ev} is not the active model version {slot.version}")
        require(len(request.prompts) > 0, "prompts", "must not be empty")
        require(len(request.prompts) <= self.cfg.max_prompts, "prompts",
                f"at most {self.cfg.max_prompts} prompts per request, got {len(request.prompts)}")
        params, n, stop, default_len = self._sampling(request.sampling, vocab)
        if len(request.prompts) * n > self.cfg.max_request_samples:
            raise exhausted(f"{len(request.prompts)} prompts x n={n} exceeds {self.cfg.max_request_samples} "
                            f"samples per request; split the batch")
        prompts = []
        for i, p in enumerate(request.prompts):
            ids = self._prompt_ids(p, f"prompts[{i}]", tok, vocab, msl)
            self._check_length(ids, params, default_len, f"prompts[{i}]", msl)
            prompts.append(ids)
            self.metrics.prompt_tokens.observe(len(ids))
        try:
            handle = self.engine.submit_batch(prompts, params, n, stop=stop, expected_version=ev or None)
        except EngineError as e:
            raise self._engine_error(e) from None
        context.add_callback(handle.cancel)  # client gone / deadline passed → its rows leave the batch
        left = context.time_remaining()
        try:
            res = handle.result(timeout=left if left is not None and left < 1e7 else None)
        except TimeoutError:
            handle.cancel()
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while generating") from None
        except EngineError as e:
            raise self._engine_error(e) from None
        results = []
        for pids, comps in zip(res.prompt_ids, res.completions):
            results.append(policy_pb2.GenerateResult(prompt_token_ids=pids,
                                                     completions=[self._completion(c) for c in comps]))
        return policy_pb2.GenerateResponse(results=results, model_version=res.model_version)

    def _completion(self, c: Completion) -> policy_pb2.Completion:
        self.metrics.samples.labels(c.finish_reason).inc()
        return policy_pb2.Completion(token_ids=c.token_ids, text=c.text,
                                     logprobs=to_proto(torch.tensor(c.logprobs, dtype=torch.float32)),
                                     finish_reason=_FINISH.get(c.finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED))

    def GenerateStream(self, request, context):
        slot = self._loaded()
        tok, vocab, msl = slot.tokenizer, slot.model.cfg.vocab_size, slot.model.cfg.max_seq_len
        require(request.sampling.n in (0, 1), "sampling.n", f"must be 0 or 1 for a stream, got {request.sampling.n}")
        params, _, stop, default_len = self._sampling(request.sampling, vocab)
        if not request.HasField("prompt"):
            raise invalid("prompt", "must be set")
        ids = self._prompt_ids(request.prompt, "prompt", tok, vocab, msl)
        self._check_length(ids, params, default_len, "prompt", msl)
        self.metrics.prompt_tokens.observe(len(ids))
        try:
            stream = self.engine.stream(ids, params, stop=stop)
        except EngineError as e:
            raise self._engine_error(e) from None
        context.add_callback(stream.cancel)
        try:
            for ev in stream:
                if isinstance(ev, StreamEnd):
                    c = ev.completion
                    self.metrics.samples.labels(c.finish_reason).inc()
                    yield policy_pb2.GenerateStreamResponse(
                        end=policy_pb2.GenerateStreamEnd(
                            finish_reason=_FINISH.get(c.finish_reason, common_pb2.FINISH_REASON_UNSPECIFIED),
                            prompt_token_ids=ev.prompt_ids, token_ids=c.token_ids, text=c.text),
                        model_version=ev.model_version)
                else:
                    yield policy_pb2.GenerateStreamResponse(
                        delta=policy_pb2.TokenDelta(token_ids=ev.token_ids, text=ev.text),
                        model_version=ev.model_version)
        except EngineError as e:
            raise self._engine_error(e) from None
        finally:
            stream.close()

    def UpdateWeights(self, request_iterator, context):
        t0 = time.perf_counter()
        try:
            out = self._update_weights(request_iterator)
        except ServiceError:
            self._staging = None  # a rejected upload keeps no buffer (the next one allocates its own size)
            self.metrics.updates.labels("rejected").inc()
            raise
        self.metrics.updates.labels("ok").inc()
        event(log, "weights updated", version=out.model_version, previous=out.previous_model_version,
              bytes=out.bytes_received, sha256=out.sha256[:12], seconds=round(time.perf_counter() - t0, 3))
        return out

    def _update_weights(self, request_iterator) -> policy_pb2.UpdateWeightsResponse:
        with self._weights_lock:  # one upload at a time: they share the staging buffer, versions must rise
            return self._receive_weights(request_iterator)

    def _receive_weights(self, request_iterator) -> policy_pb2.UpdateWeightsResponse:
        first = None
        buf: bytearray | None = None
        got = 0
        digest = hashlib.sha256()
        limit = self.cfg.max_weights_mb * 1024 * 1024
        for k, msg in enumerate(request_iterator):
            require(msg.HasField("chunk"), f"chunk (message {k})", "must be set")
            c = msg.chunk
            if first is None:
                first = c
                require(c.version >= 1, "chunk.version", f"must be >= 1, got {c.version}")
                cur = self.engine.version
                if c.version <= cur:
                    raise precondition(f"chunk.version {c.version} must be greater than the active model "
                                       f"version {cur}")
                require(bool(_HEX64.match(c.sha256)), "chunk.sha256", "must be 64 lowercase hex digits")
                require(0 < c.total_bytes <= limit, "chunk.total_bytes",
                        f"must be in [1, {limit}] ({self.cfg.max_weights_mb} MiB), got {c.total_bytes}")
                require(c.format in ("safetensors", ""), "chunk.format",
                        f"only 'safetensors' is supported, got {c.format!r}")
                # received into the buffer of the previous upload when the size matches (no page faults)
                if self._staging is None or len(self._staging) != c.total_bytes:
                    self._staging = None
                    self._staging = bytearray(c.total_bytes)
                buf = self._staging
            else:
                require(c.version == first.version, "chunk.version", f"changed mid-stream (message {k})")
                require(c.sha256 == first.sha256, "chunk.sha256", f"changed mid-stream (message {k})")
                require(c.total_bytes == first.total_bytes, "chunk.total_bytes", f"changed mid-stream (message {k})")
            require(c.offset == got, "chunk.offset",
                    f"message {k} has offset {c.offset}, expected {got} (chunks must arrive in order)")
            require(got + len(c.data) <= first.total_bytes, "chunk.data",
                    f"payload exceeds total_bytes {first.total_bytes}")
            buf[got:got + len(c.data)] = c.data
            got += len(c.data)
            digest.update(c.data)
            self.metrics.update_bytes.inc(len(c.data))
        if first is None:
            raise invalid("chunk", "no chunks received")
        require(got == first.total_bytes, "chunk.total_bytes",
                f"received {got} bytes of the declared {first.total_bytes}")
        sha = digest.hexdigest()
        require(sha == first.sha256, "chunk.sha256", f"payload hashes to {sha}, not the declared {first.sha256}")
        try:
            state = unpack_state(buf)  # views of the staging buffer: the engine copies them into a model
        except WeightsFormatError as e:
            raise invalid("chunk.data", f"not a valid safetensors payload: {e}") from None
        meta = dict(first.metadata)
        # the server's own facts last: a client's metadata cannot claim another hash or origin
        slot_meta = {**{k: v for k, v in meta.items() if k not in ("config_json", "tokenizer_json")},
                     "checkpoint_uri": f"push:{first.version}", "weights_sha256": sha}
        was_loaded = self.engine.loaded
        if meta.get("weights") == "adapter":
            state = self._with_base(state, meta)
        try:
            if was_loaded:
                prev = self.engine.update_weights(state, first.version, meta=slot_meta)
            else:
                model, tok = self._first_model(meta, state)
                prev = self.engine.update_weights(model, first.version, tokenizer=tok, meta=slot_meta)
        except StaleVersion as e:
            raise precondition(f"chunk.version: {e}") from None
        except EngineError as e:
            raise self._engine_error(e) from None
        except ValueError as e:
            raise invalid("chunk.data", str(e)) from None
        if not was_loaded:
            # the seeding upload: a LoRA run's next pushes are adapters (a few MB), so a buffer of the full
            # weights kept for reuse would sit idle through labeling and reward-model training (0.7 GB here)
            self._staging = None
            if self.on_loaded is not None:
                self.on_loaded()
        return policy_pb2.UpdateWeightsResponse(model_version=first.version, previous_model_version=prev,
                                                bytes_received=first.total_bytes, sha256=sha)

    def _with_base(self, adapter: dict, meta: dict) -> dict:
        """A LoRA adapter push (``weights: adapter``): only the ``lora_A`` / ``lora_B`` tensors came; the
        rest is the base this replica holds, which must be the one named (``lora_base``)."""
        slot = self.engine.latest
        if slot is None:
            raise precondition("chunk.metadata.weights: an adapter push needs a loaded base model (push the "
                               "full weights first)")
        base = meta.get("lora_base", "")
        require(bool(base), "chunk.metadata.lora_base", "an adapter push must name the base weights it applies to")
        if slot.meta.get("lora_base") != base:
            raise precondition(f"chunk.metadata.lora_base: this replica holds base {slot.meta.get('lora_base')!r}, "
                               f"the adapter is for {base!r}")
        own = slot.model.state_dict()
        extra = sorted(k for k in adapter if k not in own)
        require(not extra, "chunk.data", f"adapter weights the model has no place for: {extra[:4]}")
        return {**own, **adapter}

    def _first_model(self, meta: dict, state: dict) -> tuple[torch.nn.Module, object]:
        """No model yet: the first chunk's metadata must describe the architecture (and tokenizer) — a chatrl
        checkpoint's ``model_config`` (GPT, or ``architecture: hf``) and ``tokenizer.json``."""
        from chatrl.services.core.build import build_model

        require("config_json" in meta, "chunk.metadata",
                "no model is loaded: the first upload needs metadata config_json (the model config)")
        require(meta.get("weights") != "adapter", "chunk.metadata.weights",
                "no model is loaded: the first upload must carry the full weights, not an adapter")
        field = "chunk.metadata.config_json"
        try:
            mcfg = json.loads(meta["config_json"])
        except ValueError as e:
            raise invalid(field, f"not JSON: {e}") from None
        require(isinstance(mcfg, dict), field, "must be a JSON object (the model config)")
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):  # a GPT's sizes
            v = mcfg.get(key, 1)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, field,
                    f"{key} must be a positive integer, got {clip(v, 40)}")
        try:
            # the payload must fit the config before anything is allocated for it: compare on the meta device
            with torch.device("meta"):
                shapes = {k: tuple(t.shape) for k, t in build_model(mcfg, device="meta").state_dict().items()}
            for k, t in state.items():
                if k in shapes and tuple(t.shape) != shapes[k]:
                    raise invalid(field, f"does not fit the payload (shape mismatch): weights[{clip(k, 80)}] is "
                                  f"{list(t.shape)}, the config makes it {list(shapes[k])}")
            fresh = build_model(mcfg, dtype=_DTYPES[self.cfg.dtype])  # an HF model in the serving dtype
        except ImportError as e:
            raise precondition(f"chunk.metadata.config_json: a Hugging Face model needs the transformers extra: "
                               f"{e}") from None
        except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
            raise invalid(field, clip(str(e), 300)) from None
        tok = None
        if "tokenizer_json" in meta:
            try:
                if mcfg.get("architecture") == "hf":
                    from chatrl.services.core.hf import HFChatTokenizer

                    tok = HFChatTokenizer.from_str(meta["tokenizer_json"])
                else:
                    tok = ChatTokenizer.from_str(meta["tokenizer_json"])
            except Exception as e:  # noqa: BLE001
                raise invalid("chunk.metadata.tokenizer_json", str(e)) from None
            require(tok.vocab_size <= fresh.cfg.vocab_size, "chunk.metadata.tokenizer_json",
                    f"tokenizer has {tok.vocab_size} tokens, the model {fresh.cfg.vocab_size}")
        model = load_state_into(fresh, state, self.cfg.device, into=fresh)  # no second copy of the template
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tok

    def GetModelInfo(self, request, context):
        slot = self.engine.latest
        if slot is None:
            return policy_pb2.PolicyInferenceServiceGetModelInfoResponse(
                info=common_pb2.ModelInfo(name=self.cfg.name, loaded=False, model_version=0, device=self.cfg.device))
        ts = Timestamp()
        ts.FromNanoseconds(int(slot.loaded_at * 1e9))
        if slot.tokenizer is not None:
            info = model_info(self.cfg.name, slot.model, slot.tokenizer, slot.version,
                              slot.meta.get("checkpoint_uri", ""), slot.meta.get("weights_sha256", ""),
                              self.cfg.device, _dtype_name(self.cfg.dtype), ts)
        else:
            m = slot.model
            info = common_pb2.ModelInfo(
                name=self.cfg.name, model_version=slot.version, loaded=True,
                architecture=m.cfg.to_dict().get("architecture", "gpt"),
                config_json=json.dumps(m.cfg.to_dict()), parameter_count=m.num_params(),
                tokenizer=common_pb2.TokenizerInfo(vocab_size=m.cfg.vocab_size),
                max_sequence_length=m.cfg.max_seq_len, checkpoint_uri=slot.meta.get("checkpoint_uri", ""),
                weights_sha256=slot.meta.get("weights_sha256", ""), device=self.cfg.device,
                dtype=_dtype_name(self.cfg.dtype), loaded_at=ts)
        return policy_pb2.PolicyInferenceServiceGetModelInfoResponse(info=info)


def _dtype_name(dtype: str) -> str:
    return {None: "float32", "bf16": "bfloat16", "fp16": "float16"}[_DTYPES[dtype]]


def build(server_cfg: ServerConfig, cfg: PolicyConfig) -> tuple[ServiceServer, PolicyServicer]:
    torch.set_num_threads(max(1, cfg.threads))
    # each blocking Generate holds a handler thread: admit a full batch of concurrent callers and more
    server_cfg.max_concurrent_rpcs = max(server_cfg.max_concurrent_rpcs, cfg.max_batch_size + 16)
    srv = ServiceServer("policy", server_cfg)  # who may call what: runtime/roles.py
    try:
        svc = PolicyServicer(cfg, srv.registry, on_loaded=lambda: srv.set_serving(True))
    except ServiceError as e:
        raise SystemExit(f"chatrl serve policy: error: {e.message}") from None
    srv.add_service(policy_pb2_grpc.add_PolicyInferenceServiceServicer_to_server, svc, SERVICE_NAME)
    srv.start()
    srv.set_serving(svc.engine.loaded)
    if svc.engine.loaded:
        s = svc.engine.latest
        event(log, "policy model loaded", version=s.version, checkpoint=s.meta.get("checkpoint_uri", ""),
              params=s.model.num_params(), device=cfg.device, dtype=cfg.dtype)
    else:
        log.warning("policy: no checkpoint configured; NOT_SERVING until UpdateWeights pushes a model")
    return srv, svc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_service("policy", PolicyConfig, build, argv)
