"""Optional backend: a Hugging Face ``AutoModelForCausalLM`` + tokenizer from a *local* directory, behind
the interface of :class:`chatrl.services.core.model.GPT` and :class:`chatrl.services.core.tokenizer.ChatTokenizer`.

Nothing here touches the hub: every ``from_pretrained`` call gets a local directory and
``local_files_only=True``. ``transformers`` is imported lazily, so the rest of chatrl never needs it.

:class:`HFCausalLM` keeps *our* :class:`KVCache` semantics: positions are counted per row over real
tokens only (passed to HF as ``position_ids``), rows may be left-padded, and between calls the cache is
our own per-layer ``[B, H, T, Dh]`` tensors plus a validity mask, so rows can leave (``select``) and join
(``merge``). Each call converts it to a transformers ``DynamicCache`` and back, and hands HF a ready-made
4-D attention mask (causal over past + new keys, invalid keys masked, a padded query sees only itself so
nothing becomes NaN) — HF passes a 4-D mask through untouched. Supported attention implementations:
``sdpa`` (boolean mask) and ``eager`` (additive float mask). Sliding-window layers are treated as full
attention (the mask is ours).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from chatrl.services.core.model import KVCache, ModelOutput

_ATTN_IMPLS = ("sdpa", "eager")


def _local(path: str | Path) -> Path:
    return Path(str(path).removeprefix("file://"))


def is_hf_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a transformers ``config.json`` with a ``model_type``."""
    cfg = _local(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and bool(d.get("model_type"))


# --- model ------------------------------------------------------------------------------------------------

@dataclass
class HFConfig:
    """What chatrl reads from a model config (``.cfg`` of :class:`HFCausalLM`)."""
    model_type: str
    vocab_size: int
    max_seq_len: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    source: str = ""  # the directory it was loaded from
    hf_config: dict = field(default_factory=dict)
    tie_embeddings: bool = False  # (state dicts of the wrapper always carry every key)
    lora: dict | None = None  # the LoRA adapters injected (chatrl.services.core.lora.LoraConfig.to_dict())

    def to_dict(self) -> dict:
        """The checkpoint manifest's ``model_config``: with ``hf_config`` the model is rebuilt with no access
        to ``source`` (:func:`build_hf_model`)."""
        d = {"architecture": "hf", "model_type": self.model_type, "vocab_size": self.vocab_size,
             "max_seq_len": self.max_seq_len, "d_model": self.d_model, "n_layer": self.n_layer,
             "n_head": self.n_head, "n_kv_head": self.n_kv_head, "source": self.source,
             "hf_config": self.hf_config}
        if self.lora:
            d["lora"] = self.lora
        return d


# keys of a config's JSON that describe where/how it was loaded, not the architecture
_VOLATILE_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


def _config_dict(config) -> dict:
    """The architecture as JSON: everything :func:`build_hf_model` needs to rebuild the model offline.
    A GGUF/quantised load's ``quantization_config`` is dropped: chatrl holds dequantised weights."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in _VOLATILE_CONFIG_KEYS:
        d.pop(k, None)
    return d


def hf_config_from_dict(d: dict):
    """A transformers config object from :func:`_config_dict`'s JSON (no hub, no directory)."""
    from transformers import AutoConfig

    d = dict(d)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("model_config.hf_config has no model_type")
    try:
        cls = type(AutoConfig.for_model(model_type))
    except ValueError as e:
        raise ValueError(f"model_config.hf_config.model_type {model_type!r} is not known to this transformers "
                         f"version: {e}") from None
    return cls.from_dict(d)


def build_hf_model(model_config: dict, scalar_head: bool = False, device: str = "cpu",
                   dtype: torch.dtype | str | None = torch.float32, attn_implementation: str = "sdpa") -> HFCausalLM:
    """An :class:`HFCausalLM` shaped by a checkpoint manifest's ``model_config`` (``HFConfig.to_dict()``),
    with LoRA adapters injected when it names them. Weights are uninitialised: load a state dict next."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config_from_dict(model_config.get("hf_config") or {})
    cfg._attn_implementation = attn_implementation
    dtype = _dtype(dtype)
    try:  # skip the random initialisation (seconds on a 135M model): every weight is loaded next
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(cfg, **({"dtype": dtype} if _V5 else {"torch_dtype": dtype}))
    # non-persistent buffers (rotary frequencies) are computed in __init__, so they are real already
    model = HFCausalLM(hf, scalar_head=scalar_head, max_seq_len=model_config.get("max_seq_len"),
                       source=model_config.get("source", ""))
    if model_config.get("lora"):
        from chatrl.services.core.lora import LoraConfig, apply_lora

        apply_lora(model, LoraConfig.from_dict(model_config["lora"]))
    return model.to(device)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
        return names[dtype]
    return dtype


def _transformers_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed version without importing transformers (seconds) at chatrl's import
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


_V5 = _transformers_major() >= 5


def _text_config(c):
    return c.get_text_config(decoder=True) if hasattr(c, "get_text_config") else c


def _max_positions(c) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        v = getattr(c, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _make_hf_cache(keys: list[torch.Tensor] | None, values: list[torch.Tensor] | None):
    """A transformers ``DynamicCache`` holding our per-layer keys/values (plain full-attention layers)."""
    from transformers import DynamicCache

    if not keys:
        return DynamicCache()
    pairs = list(zip(keys, values))
    try:  # transformers >= 4.56 / 5.x: the constructor takes per-layer (k, v) data
        c = DynamicCache(pairs)
        if len(_read_hf_cache(c)[0]) == len(keys):
            return c
    except (TypeError, AttributeError):
        pass
    return DynamicCache.from_legacy_cache(tuple(pairs))  # older transformers


def _read_hf_cache(c) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if hasattr(c, "layers"):  # transformers >= 4.56 / 5.x
        return [layer.keys for layer in c.layers], [layer.values for layer in c.layers]
    if hasattr(c, "key_cache"):
        return list(c.key_cache), list(c.value_cache)
    if isinstance(c, (tuple, list)):
        return [kv[0] for kv in c], [kv[1] for kv in c]
    raise TypeError(f"unsupported transformers cache object {type(c).__name__}")


def _call_params(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


class HFCausalLM(nn.Module):
    """Any HF causal LM with GPT's interface: ``cfg``, ``num_params()``, ``scalar_head`` and
    ``forward(input_ids, attention_mask, cache, use_cache, lm_head) -> ModelOutput``."""

    def __init__(self, hf_model: nn.Module, scalar_head: bool = False, max_seq_len: int | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.hf = hf_model
        c = _text_config(hf_model.config)
        impl = getattr(hf_model.config, "_attn_implementation", None) or "eager"
        if impl not in _ATTN_IMPLS:
            raise ValueError(f"attention implementation {impl!r} is not supported (use one of {_ATTN_IMPLS})")
        hidden = int(getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0) or getattr(c, "d_model", 0))
        n_head = int(getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0) or 0)
        hf_dict = _config_dict(hf_model.config)
        emb = hf_model.get_input_embeddings()
        vocab = int(getattr(c, "vocab_size", 0) or emb.num_embeddings)
        msl = max_seq_len or _max_positions(c) or 2048
        self.cfg = HFConfig(model_type=str(getattr(c, "model_type", "") or hf_model.config.model_type),
                            vocab_size=vocab, max_seq_len=int(msl), d_model=hidden,
                            n_layer=int(getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0) or 0),
                            n_head=n_head, n_kv_head=int(getattr(c, "num_key_value_heads", None) or n_head),
                            source=source, hf_config=hf_dict)
        self.scalar_head = nn.Linear(hidden, 1) if scalar_head else None
        if self.scalar_head is not None:
            nn.init.normal_(self.scalar_head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.scalar_head.bias)
            p = next(hf_model.parameters())
            self.scalar_head.to(device=p.device, dtype=p.dtype)
        params = _call_params(hf_model.forward)
        self._cache_kw = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
        base = getattr(hf_model, "base_model", None)
        self._has_base = base is not None and base is not hf_model

    @classmethod
    def from_pretrained(cls, path: str | Path, scalar_head: bool = False, device: str = "cpu",
                        dtype: torch.dtype | str | None = torch.float32, attn_implementation: str = "sdpa",
                        max_seq_len: int | None = None) -> HFCausalLM:
        from transformers import AutoModelForCausalLM

        path = _local(path)
        if not is_hf_dir(path):
            raise ValueError(f"{path} is not a Hugging Face model directory (config.json with model_type)")
        dtype = _dtype(dtype)
        kw: dict = {"local_files_only": True, "attn_implementation": attn_implementation}
        if dtype is not None:
            kw["dtype" if _V5 else "torch_dtype"] = dtype
        hf = AutoModelForCausalLM.from_pretrained(str(path), **kw)
        model = cls(hf, scalar_head=scalar_head, max_seq_len=max_seq_len, source=str(path))
        head = path / "scalar_head.safetensors"
        if scalar_head and head.is_file():  # a value / reward head saved next to the HF weights
            from safetensors.torch import load_file

            model.scalar_head.load_state_dict({k.removeprefix("scalar_head."): v
                                               for k, v in load_file(str(head)).items()})
        return model.to(device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def lm_head(self) -> nn.Module:
        """The output projection (GPT's ``lm_head``): applied to ``forward(..., lm_head=False).hidden`` it
        gives the logits, so PPO can project response positions only."""
        return self.hf.get_output_embeddings()

    def _attn_mask(self, mask: torch.Tensor, past_valid: torch.Tensor) -> torch.Tensor:
        b, t = mask.shape
        dev = mask.device
        key_valid = torch.cat([past_valid, mask], dim=1)
        tp = past_valid.shape[1]
        causal = torch.ones(t, tp + t, dtype=torch.bool, device=dev).tril(diagonal=tp)
        attn = causal[None] & key_valid[:, None, :]
        eye = torch.zeros(t, tp + t, dtype=torch.bool, device=dev)
        eye[torch.arange(t), tp + torch.arange(t)] = True
        attn = (attn | (eye[None] & ~mask[:, :, None]))[:, None]  # [B,1,T,Tp+T]
        if self.hf.config._attn_implementation == "sdpa":
            return attn
        dt = next(self.hf.parameters()).dtype
        return torch.zeros(attn.shape, dtype=dt, device=dev).masked_fill(~attn, torch.finfo(dt).min)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, use_cache: bool = False, lm_head: bool = True) -> ModelOutput:
        b, t = input_ids.shape
        dev = input_ids.device
        mask = (torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(torch.bool))
        start = cache.next_pos if cache is not None else torch.zeros(b, dtype=torch.long, device=dev)
        pos = (start[:, None] + torch.cumsum(mask.long(), dim=1) - 1).clamp(min=0)
        if int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence longer than the model's max_seq_len={self.cfg.max_seq_len}")
        past_valid = cache.valid if cache is not None else torch.zeros(b, 0, dtype=torch.bool, device=dev)
        attn = self._attn_mask(mask, past_valid)
        hf_cache = None
        if cache is not None or use_cache:
            hf_cache = _make_hf_cache(cache.keys if cache is not None else None,
                                      cache.values if cache is not None else None)
        kwargs = {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos,
                  self._cache_kw: hf_cache, "use_cache": hf_cache is not None}
        logits = None
        if not lm_head and self._has_base:
            out = self.hf.base_model(**kwargs)
            hidden = out.last_hidden_state
        else:
            captured: list[torch.Tensor] = []
            hook = self.hf.get_output_embeddings().register_forward_pre_hook(
                lambda _m, args: captured.append(args[0]))
            try:
                out = self.hf(**kwargs)
            finally:
                hook.remove()
            hidden = captured[-1]
            logits = out.logits if lm_head else None
        new_cache = None
        if use_cache:
            ret = getattr(out, "cache", None)
            if ret is None:
                ret = getattr(out, "past_key_values", None)
            ks, vs = _read_hf_cache(ret if ret is not None else hf_cache)
            key_valid = torch.cat([past_valid, mask], dim=1)
            if any(k.shape[2] != key_valid.shape[1] for k in ks):
                raise RuntimeError("the transformers cache does not hold every key (sliding-window cache?)")
            new_cache = KVCache(list(ks), list(vs), key_valid, start + mask.long().sum(dim=1))
        scalar = self.scalar_head(hidden).squeeze(-1) if self.scalar_head is not None else None
        return ModelOutput(logits=logits, hidden=hidden, scalar=scalar, cache=new_cache)


# --- tokenizer --------------------------------------------------------------------------------------------

# used when the tokenizer has no chat template: chatrl's own template if its special tokens exist,
# else a plain "Role: content<eos>" transcript
CHATRL_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}{{ eos_token }}\n"
                  "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
_ROLES = ("system", "user", "assistant")


class HFChatTokenizer:
    """A transformers tokenizer with ChatTokenizer's interface (``render_chat`` returns ids + assistant mask).

    ``end_id`` (the token that ends an assistant turn) is, unless given: the first special token the chat
    template puts after an assistant message's content, else eos."""

    def __init__(self, hf_tok, end_token: str | None = None, chat_template: str | None = None) -> None:
        self.hf = hf_tok
        vocab = hf_tok.get_vocab()
        if chat_template:
            self.chat_template = chat_template
        elif getattr(hf_tok, "chat_template", None):
            self.chat_template = hf_tok.chat_template
            if isinstance(self.chat_template, dict):  # several named templates: the default one
                self.chat_template = self.chat_template.get("default") or next(iter(self.chat_template.values()))
        elif all(f"<|{r}|>" in vocab for r in _ROLES) and "<|end|>" in vocab:
            self.chat_template = CHATRL_TEMPLATE
        else:
            self.chat_template = PLAIN_TEMPLATE
        eos = hf_tok.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token")
        self.eot_id = int(eos)
        self.pad_id = int(hf_tok.pad_token_id) if hf_tok.pad_token_id is not None else self.eot_id
        self.special_ids = {int(i) for i in hf_tok.all_special_ids}
        for tok in getattr(hf_tok, "added_tokens_decoder", {}).values():
            if getattr(tok, "special", False):
                self.special_ids.add(int(hf_tok.convert_tokens_to_ids(str(tok))))
        self.role_ids = {r: vocab[f"<|{r}|>"] for r in _ROLES if f"<|{r}|>" in vocab}
        if end_token is not None:
            if end_token not in vocab:
                raise ValueError(f"end token {end_token!r} is not in the vocabulary")
            self.end_id = int(vocab[end_token])
        else:
            self.end_id = self._detect_end_id()
        gen = self.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)[0]
        self.assistant_id = self.role_ids.get("assistant", gen[-1] if gen and gen[-1] in self.special_ids else None)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, end_token: str | None = None) -> HFChatTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(_local(path)), local_files_only=True), end_token=end_token)

    def save(self, path: str | Path) -> None:
        """A plain HF tokenizer directory (tokenizer.json, tokenizer_config.json, the chat template)."""
        self.hf.chat_template = self.chat_template
        self.hf.save_pretrained(str(_local(path)))

    FORMAT = "chatrl-hf-tokenizer/1"

    def to_str(self) -> str:
        """The whole tokenizer as one JSON document — what a chatrl checkpoint stores as ``tokenizer.json``
        (:func:`chatrl.services.core.checkpoint.save_checkpoint` takes one string): the ``tokenizers``
        model, the special tokens, the chat template and the end-of-turn token. :meth:`from_str` inverts it.
        Only fast (``tokenizers``-backed) tokenizers can be stored."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer {type(self.hf).__name__} is not backed by the tokenizers library "
                             f"(a 'fast' tokenizer with tokenizer.json); chatrl cannot store it in a checkpoint")
        named = {k: v for k, v in self.hf.special_tokens_map.items() if isinstance(v, str)}
        extra = [t for t in self.hf.all_special_tokens if t not in named.values()]
        return json.dumps({"format": self.FORMAT, "tokenizer": json.loads(backend.to_str()),
                           "special_tokens": named, "additional_special_tokens": extra,
                           "chat_template": self.chat_template,
                           "end_token": self.hf.convert_ids_to_tokens(self.end_id), "end_id": self.end_id},
                          sort_keys=True)

    @classmethod
    def is_serialized(cls, text: str) -> bool:
        return text.lstrip().startswith("{") and f'"format": "{cls.FORMAT}"' in text

    @classmethod
    def from_str(cls, text: str) -> HFChatTokenizer:
        """Rebuild a tokenizer from :meth:`to_str` (no directory, no hub)."""
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"tokenizer: invalid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            raise ValueError(f"tokenizer: not a {cls.FORMAT} document")
        ht = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(d["tokenizer"])),
                                     **d["special_tokens"])
        if d["additional_special_tokens"]:
            ht.add_special_tokens({"additional_special_tokens": list(d["additional_special_tokens"])})
        ht.chat_template = d["chat_template"]
        tok = cls(ht, end_token=d["end_token"], chat_template=d["chat_template"])
        if tok.end_id != d["end_id"]:
            raise ValueError(f"tokenizer: end token {d['end_token']!r} has id {tok.end_id}, stored {d['end_id']}")
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    # --- text -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    # --- chat template --------------------------------------------------------------------------
    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        text = self.hf.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise TypeError("apply_chat_template(tokenize=False) did not return a string")
        return text

    def _assistant_spans(self, messages: Sequence[dict], full: str) -> list[tuple[int, int, str]]:
        """Character spans [a, b) of each assistant turn in ``full`` (content + end of turn)."""
        spans = []
        cursor = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if i and full.startswith(through) and through.startswith(before):
                a, b = len(before), len(through)
            else:  # a template without the prefix property: find the content itself
                a = full.find(m["content"], cursor)
                if a < 0:
                    raise ValueError(f"cannot locate messages[{i}] in the rendered chat")
                b = a + len(m["content"])
                nxt = full.find(self.hf.convert_ids_to_tokens(self.end_id), b)
                if nxt >= 0:
                    b = nxt + len(self.hf.convert_ids_to_tokens(self.end_id))
            spans.append((a, b, m["content"]))
            cursor = b
        return spans

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """Token ids and the assistant mask (1 on each assistant message's content tokens and the token
        ending its turn; never on role markers, other turns or what the template adds after the end)."""
        msgs = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES:
                raise ValueError(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            msgs.append({"role": role, "content": content})
        full = self._render(msgs, add_generation_prompt)
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        mask = [0] * len(ids)
        end_id = getattr(self, "end_id", None)  # (None while __init__ detects it)
        spans = self._assistant_spans(msgs, full) if any(m["role"] == "assistant" for m in msgs) else []
        for a, b, _ in spans:
            ended = False
            for j, (s, e) in enumerate(offsets):
                if e <= s or s < a or e > b:
                    continue
                if ended:
                    break
                mask[j] = 1
                if ids[j] == end_id:
                    ended = True
        return ids, mask

    def _detect_end_id(self) -> int:
        probe = "zq"
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
        try:
            full = self._render(msgs, False)
        except Exception:  # noqa: BLE001 — a template that refuses the probe: use eos
            return self.eot_id
        k = full.rfind(probe)
        if k < 0:
            return self.eot_id
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"]):
            if s >= k + len(probe) and tid in self.special_ids:
                return int(tid)
        return self.eot_id

    def prompt_ids(self, prompt: str | Sequence[dict], system: str | None = None) -> list[int]:
        """A chat prompt ready for generation: one user turn, or a conversation ending with a user turn."""
        if not isinstance(prompt, str):
            return self.render_chat(list(prompt), add_generation_prompt=True)[0]
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.render_chat(msgs, add_generation_prompt=True)[0]

    def response_text(self, ids: Sequence[int]) -> tuple[str, bool]:
        """Decode a generated response; (text, finished) where finished = it produced the end token (or eos)."""
        ids = list(ids)
        cut = next((j for j, t in enumerate(ids) if t in (self.end_id, self.eot_id)), None)
        if cut is not None:
            ids = ids[:cut]
        return self.decode(ids), cut is not None


# --- checks before any expensive work ----------------------------------------------------------------------

def check_hf_dir(path: str | Path, field: str = "model.path") -> dict:
    """The parsed ``config.json`` of a local HF model directory, or a ValueError naming ``field`` and what is
    missing. Reads two small files; loads no weights. chatrl loads only safetensors weights (no pickle)."""
    p = _local(path)
    if not p.exists():
        raise ValueError(f"{field}: {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"{field}: {p} is not a directory (a Hugging Face model directory is expected)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{field}: {p} is not a Hugging Face model directory (no config.json)")
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}: {cfg} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not d.get("model_type"):
        raise ValueError(f"{field}: {cfg} has no model_type (not a transformers model config)")
    if not any(p.glob("*.safetensors")):
        found = "pytorch_model.bin (pickle, which chatrl never loads)" if any(p.glob("*.bin")) else "none"
        raise ValueError(f"{field}: {p} has no *.safetensors weights (found: {found})")
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        raise ValueError(f"{field}: {p} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return d


def has_chat_template(path: str | Path) -> bool:
    """Whether the tokenizer files in ``path`` carry a chat template (no tokenizer is loaded)."""
    p = _local(path)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    try:
        tc = json.loads((p / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(tc.get("chat_template"))


def check_chat_template(path: str | Path, field: str = "model.path") -> None:
    """SFT masks and prompts come from the tokenizer's own chat template: a run refuses a tokenizer
    without one (serving falls back to chatrl's template, see :class:`HFChatTokenizer`)."""
    if not has_chat_template(path):
        raise ValueError(f"{field}: the tokenizer in {_local(path)} has no chat template (chat_template in "
                         f"tokenizer_config.json or chat_template.jinja); chatrl needs one to render "
                         f"conversations and mask assistant turns — use an instruct/chat model or add one")


def context_length(hf_config: dict) -> int | None:
    """The model's context (max positions) from a config.json dict, or None when it sets none."""
    for d in (hf_config.get("text_config") or {}, hf_config):
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
            v = d.get(name)
            if isinstance(v, int) and v > 0:
                return v
    return None


def check_context(context: int | None, lengths: dict[str, int], source: str = "the model") -> None:
    """Each configured length (field name → tokens, e.g. ``{"sft.max_len": 512}`` or
    ``{"ppo.prompt_len + ppo.max_new_tokens": 160}``) must fit the model's context; the first that does
    not is a ValueError naming its field."""
    if context is None:
        return
    for name, n in lengths.items():
        if n > context:
            raise ValueError(f"{name} = {n} exceeds the context of {source} ({context} tokens); "
                             f"lower {name} or use a model with a longer context")


def check_hf_model(path: str | Path, lengths: dict[str, int] | None = None, field: str = "model.path",
                   lora=None, lora_field: str = "lora.target_modules") -> dict:
    """Every check a run needs before it loads weights: an HF directory, a chat template, the configured
    lengths within the context, LoRA target modules that exist. Returns the config.json dict."""
    d = check_hf_dir(path, field)
    check_chat_template(path, field)
    check_context(context_length(d), lengths or {}, f"{field} ({_local(path)})")
    if lora is not None and getattr(lora, "enabled", True):
        from chatrl.services.core.lora import check_lora_targets

        check_lora_targets(d, lora, lora_field)
    return d


# --- loading ----------------------------------------------------------------------------------------------

def load_hf(path: str | Path, scalar_head: bool = False, device: str = "cpu",
            dtype: torch.dtype | str | None = torch.float32, end_token: str | None = None,
            attn_implementation: str = "sdpa") -> tuple[HFCausalLM, HFChatTokenizer]:
    """(model, tokenizer) from a local HF directory; never contacts the hub."""
    model = HFCausalLM.from_pretrained(path, scalar_head=scalar_head, device=device, dtype=dtype,
                                       attn_implementation=attn_implementation)
    tok = HFChatTokenizer.load(path, end_token=end_token)
    return model, tok
