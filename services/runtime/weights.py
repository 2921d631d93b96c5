"""Weights on the wire: a state dict as one safetensors payload, packed into a reusable buffer and read
back as zero-copy views.

``UpdateWeights`` moves the whole policy every PPO iteration. ``safetensors.torch.save``/``load`` return
fresh ``bytes`` each time, and on CPU the first touch of hundreds of fresh megabytes (page faults) costs
more than the copies themselves. The same payload is written into, and received into, a buffer that is
kept between pushes; the bytes are the safetensors format (readable by the ``safetensors`` library, which
the tests check both ways).

Layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple of 8),
then the tensors back to back; the header maps each name to dtype, shape and ``data_offsets`` relative to
the end of the header.
"""

from __future__ import annotations

import json
import struct

import torch

_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
_DTYPE = {v: k for k, v in _CODE.items()}
MAX_HEADER = 100 * 1024 * 1024


class WeightsFormatError(ValueError):
    pass


def pack_state(state: dict[str, torch.Tensor], out: bytearray | None = None,
               metadata: dict[str, str] | None = None) -> bytearray:
    """The safetensors bytes of ``state``, written into ``out`` when it has exactly the right size (as it
    has for every push of the same model after the first), else into a new buffer."""
    tensors = []
    for name, t in state.items():
        if not torch.is_tensor(t):
            raise TypeError(f"state[{name!r}] is not a tensor")
        if t.dtype not in _CODE:
            raise TypeError(f"state[{name!r}]: unsupported dtype {t.dtype}")
        tensors.append((name, t.detach()))
    # widest dtypes first: every tensor then starts at a multiple of its element size
    tensors.sort(key=lambda nt: (-nt[1].element_size(), nt[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, t in tensors:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _CODE[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    total = 8 + len(raw) + off
    if out is None or len(out) != total:
        out = bytearray(total)
    out[:8] = struct.pack("<Q", len(raw))
    out[8:8 + len(raw)] = raw
    base = 8 + len(raw)
    for name, t in tensors:
        lo, hi = header[name]["data_offsets"]
        if hi > lo:
            dst = torch.frombuffer(out, dtype=torch.uint8, count=hi - lo, offset=base + lo)
            dst.copy_(t.contiguous().cpu().reshape(-1).view(torch.uint8))
    return out


def unpack_state(buf: bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (no copy; they are valid while ``buf`` is unchanged). Raises
    WeightsFormatError naming what is wrong with a malformed payload."""
    mv = memoryview(buf)
    if len(mv) < 8:
        raise WeightsFormatError(f"payload of {len(mv)} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", mv[:8])
    if n > min(MAX_HEADER, len(mv) - 8):
        raise WeightsFormatError(f"header length {n} does not fit the {len(mv)}-byte payload")
    try:
        header = json.loads(bytes(mv[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsFormatError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WeightsFormatError("header is not a JSON object")
    header.pop("__metadata__", None)
    base, size = 8 + n, len(mv) - 8 - n
    spans = []
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPE[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            lo, hi = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsFormatError(f"tensor {name!r}: header entry {info!r} needs a known dtype, a shape "
                                     "and two data_offsets") from None
        count = 1
        for s in shape:
            if s < 0:
                raise WeightsFormatError(f"tensor {name!r}: negative dimension in shape {shape}")
            count *= s
        item = torch.empty((), dtype=dtype).element_size()
        if not 0 <= lo <= hi <= size or hi - lo != count * item:
            raise WeightsFormatError(f"tensor {name!r}: data_offsets [{lo}, {hi}] do not hold {shape} "
                                     f"{info['dtype']} within {size} data bytes")
        spans.append((lo, hi, name))
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + lo) % item == 0:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + lo).view(shape)
        else:  # unaligned (another writer's layout): copy this one
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=hi - lo, offset=base + lo)
            out[name] = raw.clone().view(dtype).view(shape)
    spans.sort()
    end = 0
    for lo, hi, name in spans:
        if lo != end:
            raise WeightsFormatError(f"tensor {name!r} starts at {lo}, expected {end} (overlap or hole)")
        end = hi
    if end != size:
        raise WeightsFormatError(f"tensors cover {end} of {size} data bytes")
    return out
