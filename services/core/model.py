"""A small GPT decoder: pre-norm blocks, causal self-attention via ``scaled_dot_product_attention``,
rotary or learned positions, an LM head and an optional scalar head (value / reward).

Batches may be padded on either side: every call takes an ``attention_mask`` [B, T] (1 = real token)
and positions are counted per row over real tokens only, so a left-padded prompt and an unpadded one
produce the same logits. The :class:`KVCache` keeps per-row key validity, which lets rows leave a
decoding batch (``select``) and new rows join it (``merge``) — the basis of dynamic batching in the
policy-inference service.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 3072
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    max_seq_len: int = 256
    dropout: float = 0.0
    positions: str = "rotary"  # "rotary" | "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"model.positions must be 'rotary' or 'learned', got {self.positions!r}")
        if self.positions == "rotary" and (self.d_model // self.n_head) % 2:
            raise ValueError("model.d_model / model.n_head must be even for rotary positions")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config field(s): {sorted(unknown)}")
        return cls(**d)


class KVCache:
    """Per-layer keys/values [B, H, T, Dh], a key-validity mask [B, T] and each row's next position."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor,
                 next_pos: torch.Tensor) -> None:
        self.keys, self.values, self.valid, self.next_pos = keys, values, valid, next_pos

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: torch.Tensor | list[int]) -> KVCache:
        """Keep only ``rows`` (finished requests leave the batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        cache = KVCache([k[idx] for k in self.keys], [v[idx] for v in self.values], self.valid[idx],
                        self.next_pos[idx])
        return cache.compact()

    def compact(self) -> KVCache:
        """Drop leading columns no row uses any more (after rows left)."""
        used = self.valid.any(dim=0)
        if used.numel() == 0 or not used.any():
            return self
        first = int(used.nonzero()[0])
        if first == 0:
            return self
        return KVCache([k[:, :, first:] for k in self.keys], [v[:, :, first:] for v in self.values],
                       self.valid[:, first:], self.next_pos)

    @staticmethod
    def merge(a: KVCache, b: KVCache) -> KVCache:
        """Concatenate two batches (new requests join), left-padding the shorter cache."""
        t = max(a.length, b.length)

        def pad(c: KVCache) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
            p = t - c.length
            if p == 0:
                return c.keys, c.values, c.valid
            ks = [F.pad(k, (0, 0, p, 0)) for k in c.keys]
            vs = [F.pad(v, (0, 0, p, 0)) for v in c.values]
            return ks, vs, F.pad(c.valid, (p, 0), value=False)

        ak, av, am = pad(a)
        bk, bv, bm = pad(b)
        return KVCache([torch.cat([x, y]) for x, y in zip(ak, bk)], [torch.cat([x, y]) for x, y in zip(av, bv)],
                       torch.cat([am, bm]), torch.cat([a.next_pos, b.next_pos]))


def rope_tables(pos: torch.Tensor, dh: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, Dh/2] of the rotary angles at integer positions pos [B, T] (once per forward)."""
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, device=pos.device, dtype=torch.float32) / dh))
    ang = pos.to(torch.float32)[:, None, :, None] * inv
    return ang.cos(), ang.sin()


def _rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x [B, H, T, Dh] with precomputed cos/sin tables."""
    cos, sin = tables[0].to(x.dtype), tables[1].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = cfg.dropout

    def forward(self, x, rope, attn_mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        b, t, d = x.shape
        h = self.cfg.n_head
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _rope(q, rope), _rope(k, rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.drop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.proj(y), (k, v)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, attn_mask, past):
        a, kv = self.attn(self.ln1(x), rope, attn_mask, past)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, kv


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when the LM head is skipped)
    hidden: torch.Tensor  # [B, T, D] final-norm hidden states
    scalar: torch.Tensor | None  # [B, T] scalar head (value / reward) or None
    cache: KVCache | None


class GPT(nn.Module):
    """Decoder-only transformer with an LM head and, optionally, a scalar head."""

    def __init__(self, cfg: GPTConfig, scalar_head: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.scalar_head = nn.Linear(cfg.d_model, 1) if scalar_head else None
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.scalar_head is not None:
            nn.init.normal_(self.scalar_head.weight, std=1.0 / math.sqrt(cfg.d_model + 1))
            nn.init.zeros_(self.scalar_head.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, use_cache: bool = False, lm_head: bool = True) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = real token). With ``cache`` the new tokens are
        appended after the cached ones (their positions continue each row's count)."""
        b, t = input_ids.shape
        dev = input_ids.device
        mask = (torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None
                else attention_mask.to(torch.bool))
        start = cache.next_pos if cache is not None else torch.zeros(b, dtype=torch.long, device=dev)
        pos = start[:, None] + torch.cumsum(mask.long(), dim=1) - 1
        pos = pos.clamp(min=0)
        past_valid = cache.valid if cache is not None else torch.zeros(b, 0, dtype=torch.bool, device=dev)
        key_valid = torch.cat([past_valid, mask], dim=1)  # [B, Tp+T]
        tp = past_valid.shape[1]
        causal = torch.ones(t, tp + t, dtype=torch.bool, device=dev).tril(diagonal=tp)
        attn = causal[None] & key_valid[:, None, :]
        # a padded query row attending to nothing would give NaN: let it see itself
        eye = torch.zeros(t, tp + t, dtype=torch.bool, device=dev)
        eye[torch.arange(t), tp + torch.arange(t)] = True
        attn = attn | (eye[None] & ~mask[:, :, None])
        attn = attn[:, None]  # [B,1,T,Tp+T]
        if int(pos.max()) >= self.cfg.max_seq_len and self.pos_emb is not None:
            raise ValueError(f"sequence longer than model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        rope = (rope_tables(pos, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base)
                if self.cfg.positions == "rotary" else None)
        new_k, new_v = [], []
        for i, blk in enumerate(self.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, (k, v) = blk(x, rope, attn, past)
            if use_cache:
                new_k.append(k)
                new_v.append(v)
        x = self.ln_f(x)
        new_cache = None
        if use_cache:
            new_cache = KVCache(new_k, new_v, key_valid, start + mask.long().sum(dim=1))
        logits = self.lm_head(x) if lm_head else None
        scalar = self.scalar_head(x).squeeze(-1) if self.scalar_head is not None else None
        return ModelOutput(logits=logits, hidden=x, scalar=scalar, cache=new_cache)


def autocast(dtype: str | None, device: str = "cpu"):
    """bf16 autocast context when asked for ("bf16"/"bfloat16"); fp16 is refused on CPU (≈400× slower)."""
    if dtype in (None, "fp32", "float32"):
        return nullcontext()
    if dtype in ("bf16", "bfloat16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    if dtype in ("fp16", "float16"):
        if device == "cpu":
            raise ValueError("dtype fp16 is not supported on CPU (use bf16 or fp32)")
        return torch.autocast(device_type=device, dtype=torch.float16)
    raise ValueError(f"unknown dtype {dtype!r} (fp32 | bf16 | fp16)")
