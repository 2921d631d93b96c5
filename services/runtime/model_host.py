"""A versioned model loaded from a checkpoint, swappable atomically — shared by the model services.

``LoadModel`` builds the new model off to the side and swaps one reference under a lock; a request
takes a snapshot (model, tokenizer, version) once and is served entirely by it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from chatrl.services.core.build import model_from_checkpoint, tokenizer_from_checkpoint
from chatrl.services.core.checkpoint import CheckpointError, load_checkpoint
from chatrl.services.core.hf import is_hf_dir
from chatrl.services.core.model import GPT
from chatrl.services.core.tokenizer import SPECIAL_TOKENS, ChatTokenizer
from chatrl.services.proto.chatrl.v1 import common_pb2
from chatrl.services.runtime.errors import clip, invalid, not_found, precondition

MAX_URI_CHARS = 4096  # PATH_MAX: anything longer cannot name a file


@dataclass(frozen=True)
class Loaded:
    model: torch.nn.Module  # a GPT, or an HF model behind the same interface (chatrl.services.core.hf)
    tok: ChatTokenizer
    version: int
    uri: str
    sha256: str
    loaded_at: float
    meta: dict


class ModelHost:
    """``dtype`` (fp32 | bf16 | fp16): what the model computes in. A Hugging Face model also *holds* its weights
    in it (bf16 halves the memory and the bytes each decode step reads); chatrl's GPT keeps fp32 weights and
    runs under autocast."""

    def __init__(self, name: str, scalar_head: bool, device: str = "cpu", dtype: str | None = None) -> None:
        self.name, self.scalar_head, self.device, self.dtype = name, scalar_head, device, dtype
        self._lock = threading.Lock()
        self._cur: Loaded | None = None

    def current(self) -> Loaded:
        cur = self._cur
        if cur is None:
            raise precondition(f"{self.name}: no model loaded (call LoadModel or start with --checkpoint)")
        return cur

    @property
    def version(self) -> int:
        return self._cur.version if self._cur else 0

    def load(self, uri: str, version: int = 0, sha256: str = "") -> Loaded:
        """Load a checkpoint directory (or a stage dir with LATEST); version 0 = current + 1. Nothing is
        trusted: the path is checked before it touches the file system, the weights must match the
        architecture exactly and be finite, and ``sha256`` (when given) must be the weights' hash. Any
        failure leaves the current model serving."""
        if not uri:
            raise invalid("checkpoint_uri", "must not be empty")
        if len(uri) > MAX_URI_CHARS or "\x00" in uri:
            raise invalid("checkpoint_uri", f"must be a path of at most {MAX_URI_CHARS} characters without NUL, "
                          f"got {clip(uri, 80)}")
        if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
            raise invalid("sha256", f"must be 64 lowercase hex digits, got {clip(sha256, 80)}")
        path = Path(uri.removeprefix("file://"))
        try:
            exists = path.exists()
        except OSError as e:  # ENAMETOOLONG for a path component, ELOOP, …
            raise invalid("checkpoint_uri", f"{clip(uri)} is not a usable path: {e.strerror}") from None
        if not exists:
            raise not_found(f"checkpoint_uri: {clip(uri)} does not exist")
        model, tok, where, digest, meta = (self._load_hf(path) if is_hf_dir(path) else self._load_chatrl(path))
        if sha256 and sha256 != digest:
            raise invalid("sha256", f"checkpoint weights hash {digest[:12]}… differs from {sha256[:12]}…")
        bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
                   None)
        if bad is not None:
            raise invalid("checkpoint_uri", f"{clip(where)}: tensor {bad} holds non-finite values (NaN/inf)")
        model.to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with self._lock:
            cur_v = self.version
            if version and version <= cur_v:
                raise invalid("model_version", f"must be greater than the current version {cur_v}, got {version}")
            self._cur = Loaded(model, tok, version or cur_v + 1, where, digest, time.time(), meta)
            return self._cur

    def _load_chatrl(self, path: Path):
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            raise invalid("checkpoint_uri", str(e)) from None
        from safetensors import safe_open

        with safe_open(str(ck.path / "model.safetensors"), framework="pt") as f:  # names only, no tensors
            has_head = any(k.startswith("scalar_head.") for k in f.keys())
        if self.scalar_head and not has_head:
            raise invalid("checkpoint_uri", f"{ck.path} has no scalar head (not a reward model checkpoint)")
        try:  # GPT or HF (architecture "hf", LoRA adapters included), as the manifest says
            model = model_from_checkpoint(ck, self.scalar_head, self.device, self.dtype)
            tok = tokenizer_from_checkpoint(ck)
        except ImportError as e:  # transformers is an optional extra
            raise precondition(f"checkpoint_uri: {ck.path} holds a Hugging Face model, which needs the "
                               f"transformers extra (pip install 'chatrl[hf]'): {e}") from None
        except (ValueError, KeyError) as e:
            raise invalid("checkpoint_uri", f"{ck.path}: {clip(str(e), 400)}") from None
        except RuntimeError as e:  # load_state_dict: a tensor's shape differs from the architecture's
            raise invalid("checkpoint_uri", f"{ck.path}: weights do not fit the model config (shape mismatch): "
                          f"{clip(str(e), 400)}") from None
        return model, tok, str(ck.path), ck.sha256, ck.manifest.get("meta", {})

    def _load_hf(self, path: Path):
        """A local Hugging Face model directory (AutoModelForCausalLM + tokenizer), no hub access."""
        import hashlib

        from chatrl.services.core.checkpoint import sha256_file
        from chatrl.services.core.hf import load_hf

        if self.scalar_head and not (path / "scalar_head.safetensors").is_file():
            raise invalid("checkpoint_uri", f"{path} has no scalar_head.safetensors (not a reward model)")
        try:
            model, tok = load_hf(path, scalar_head=self.scalar_head, device=self.device,
                                 dtype=self.dtype or torch.float32)
        except ImportError as e:  # transformers is an optional extra
            raise precondition(f"checkpoint_uri: {path} is a Hugging Face model directory, which needs the "
                               f"transformers extra (pip install 'chatrl[hf]'): {e}") from None
        except (OSError, ValueError, KeyError) as e:  # a corrupt or incomplete directory is the request's fault
            raise invalid("checkpoint_uri", f"{path} is not a loadable Hugging Face model: {e}") from None
        digest = hashlib.sha256(b"".join(sha256_file(f).encode() for f in sorted(path.glob("*.safetensors"))))
        return model, tok, str(path), digest.hexdigest(), {}

    def info(self) -> common_pb2.ModelInfo:
        cur = self._cur
        if cur is None:
            return common_pb2.ModelInfo(name=self.name, loaded=False)
        ts = Timestamp()
        ts.FromNanoseconds(int(cur.loaded_at * 1e9))
        return model_info(self.name, cur.model, cur.tok, cur.version, cur.uri, cur.sha256, self.device,
                          self.dtype, ts)


def model_info(name: str, model: GPT, tok: ChatTokenizer, version: int, uri: str, sha256: str, device: str,
               dtype: str | None, loaded_at: Timestamp | None = None) -> common_pb2.ModelInfo:
    import hashlib

    hf_tok = getattr(tok, "hf", None)  # an HFChatTokenizer: the model's own tokenizer and chat template
    tinfo = common_pb2.TokenizerInfo(
        kind=f"hf:{type(hf_tok).__name__}" if hf_tok is not None else "bytelevel-bpe", vocab_size=tok.vocab_size,
        eos_token_id=tok.end_id, pad_token_id=tok.pad_id,
        special_tokens=list(hf_tok.all_special_tokens) if hf_tok is not None else SPECIAL_TOKENS,
        chat_template=tok.chat_template if hf_tok is not None else "chatrl: <|role|>content<|end|>",
        sha256=hashlib.sha256(tok.to_str().encode()).hexdigest())
    return common_pb2.ModelInfo(
        name=name, model_version=version, loaded=True, architecture=model.cfg.to_dict().get("architecture", "gpt"),
        config_json=json.dumps({**model.cfg.to_dict(), "scalar_head": model.scalar_head is not None}),
        parameter_count=model.num_params(), tokenizer=tinfo, max_sequence_length=model.cfg.max_seq_len,
        checkpoint_uri=uri, weights_sha256=sha256, device=device,
        dtype={"bf16": "bfloat16", None: "float32"}.get(dtype, dtype or "float32"), loaded_at=loaded_at)


class ServedModel:
    """A ModelHost bound to its server: loading sets the version gauge and marks the server SERVING.
    Shared by the reward-scoring and reference-model services (their LoadModel/start-up)."""

    def __init__(self, host: ModelHost, version_gauge) -> None:
        self.host = host
        self.gauge = version_gauge
        self.server = None  # a ServiceServer, once started

    def load(self, uri: str, version: int = 0, sha256: str = "") -> common_pb2.ModelInfo:
        self.host.load(uri, version, sha256)
        self.gauge.set(self.host.version)
        if self.server is not None:
            self.server.set_serving(True)
        return self.host.info()

    def start(self, server, checkpoint: str) -> None:
        """Start serving; load ``checkpoint`` if given (else NOT_SERVING until LoadModel)."""
        server.start()
        self.server = server
        if checkpoint:
            self.load(checkpoint)
        server.set_serving(self.host.version > 0)
