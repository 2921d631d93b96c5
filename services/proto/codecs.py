"""Wire codecs beside the contract (hand-written; ``make proto`` never touches this file).

- **Tensors** (``chatrl.v1.Tensor``): raw little-endian bytes + dtype + shape, never repeated floats.
- **Weights** (``UpdateWeights`` chunks): a state dict as one safetensors payload, packed into a reusable
  buffer and read back as zero-copy views.

Clients install without torch: everything here works on numpy arrays, and imports torch only when a
caller hands it torch tensors or asks for them back (``as_torch=True``) — the services and the trainer.

``UpdateWeights`` moves the whole policy every PPO iteration. ``safetensors.torch.save``/``load`` return
fresh ``bytes`` each time, and on CPU the first touch of hundreds of fresh megabytes (page faults) costs
more than the copies themselves; so the payload is written into, and received into, a buffer kept between
pushes. The bytes are the safetensors format (the tests read and write them with the ``safetensors``
library): 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple of 8),
then the tensors back to back; the header maps each name to dtype, shape and ``data_offsets`` relative to
the end of the header.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any

import numpy as np

from chatrl.services.proto.chatrl.v1 import common_pb2

# --- dtypes: proto enum / safetensors code / numpy / torch name ------------------------------------------
# bfloat16 has no numpy dtype: it travels as its 16 raw bits (int16) and decodes to float32 for numpy users.
_DTYPES = [  # (proto, safetensors, numpy, torch attribute, bytes)
    (common_pb2.DTYPE_FLOAT32, "F32", np.float32, "float32", 4),
    (common_pb2.DTYPE_BFLOAT16, "BF16", None, "bfloat16", 2),
    (common_pb2.DTYPE_FLOAT16, "F16", np.float16, "float16", 2),
    (common_pb2.DTYPE_FLOAT64, "F64", np.float64, "float64", 8),
    (common_pb2.DTYPE_INT8, "I8", np.int8, "int8", 1),
    (common_pb2.DTYPE_UINT8, "U8", np.uint8, "uint8", 1),
    (common_pb2.DTYPE_INT16, "I16", np.int16, "int16", 2),
    (common_pb2.DTYPE_INT32, "I32", np.int32, "int32", 4),
    (common_pb2.DTYPE_INT64, "I64", np.int64, "int64", 8),
    (common_pb2.DTYPE_BOOL, "BOOL", np.bool_, "bool", 1),
]
_BY_PROTO = {d[0]: d for d in _DTYPES}
_BY_CODE = {d[1]: d for d in _DTYPES}
_BY_NUMPY = {np.dtype(d[2]): d for d in _DTYPES if d[2] is not None}
_BY_TORCH_NAME = {d[3]: d for d in _DTYPES}
MAX_HEADER = 100 * 1024 * 1024


class TensorDecodeError(ValueError):
    pass


class WeightsFormatError(ValueError):
    pass


def _is_torch(x: Any) -> bool:
    # by module name, so that asking never imports torch
    return type(x).__module__.split(".")[0] == "torch"


def _torch():
    import torch  # only reached by callers that use torch tensors (the services, the trainer)

    return torch


def _as_numpy(x: Any, what: str) -> tuple[np.ndarray, tuple]:
    """(a C-contiguous numpy array of the raw values, the dtype row); a torch bfloat16 tensor becomes
    its int16 bit pattern."""
    if _is_torch(x):
        t = x.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _BY_TORCH_NAME:
            raise TypeError(f"{what}: unsupported dtype {t.dtype}")
        row = _BY_TORCH_NAME[name]
        torch = _torch()
        return (t.view(torch.int16) if name == "bfloat16" else t).numpy(), row
    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype not in _BY_NUMPY:
        raise TypeError(f"{what}: unsupported dtype {a.dtype}")
    return a, _BY_NUMPY[a.dtype]


# --- tensors -----------------------------------------------------------------------------------------------

def tensor_to_proto(x: Any) -> common_pb2.Tensor:
    """A numpy array, a list, or a torch tensor → ``chatrl.v1.Tensor``."""
    arr, row = _as_numpy(x, "tensor")
    if sys.byteorder != "little":
        arr = arr.byteswap()
    return common_pb2.Tensor(data=arr.tobytes(), dtype=row[0], shape=list(arr.shape))


def tensor_from_proto(msg: common_pb2.Tensor, field: str = "tensor", as_torch: bool = False):
    """``chatrl.v1.Tensor`` → numpy array (bfloat16 widened to float32), or a torch tensor of the wire
    dtype with ``as_torch``. Raises TensorDecodeError naming ``field`` when the message is inconsistent."""
    row = _BY_PROTO.get(msg.dtype)
    if row is None:
        raise TensorDecodeError(f"{field}.dtype: unsupported or unspecified dtype {msg.dtype}")
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise TensorDecodeError(f"{field}.shape: negative dimension in {shape}")
    n = int(np.prod(shape)) if shape else 1
    if len(msg.data) != n * row[4]:
        raise TensorDecodeError(f"{field}.data: {len(msg.data)} bytes, expected {n * row[4]} for shape "
                                f"{shape} of {row[3]}")
    raw_dt = np.dtype(row[2] if row[2] is not None else np.int16)
    arr = np.frombuffer(msg.data, dtype=raw_dt.newbyteorder("<")).reshape(shape).astype(raw_dt)  # a copy
    if as_torch:
        torch = _torch()
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if row[1] == "BF16" else t
    if row[1] == "BF16":  # the top 16 bits of a float32
        return (arr.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return arr


# --- weights -----------------------------------------------------------------------------------------------

def pack_state(state: dict[str, Any], out: bytearray | None = None,
               metadata: dict[str, str] | None = None) -> bytearray:
    """The safetensors bytes of ``state`` (name → torch tensor or numpy array), written into ``out`` when
    it has exactly the right size (as it has for every push of the same model after the first), else into
    a new buffer."""
    tensors = []
    for name, t in state.items():
        if not (_is_torch(t) or isinstance(t, np.ndarray)):
            raise TypeError(f"state[{name!r}] is not a tensor")
        arr, row = _as_numpy(t, f"state[{name!r}]")
        tensors.append((name, arr, row))
    # widest dtypes first: every tensor then starts at a multiple of its element size
    tensors.sort(key=lambda x: (-x[2][4], x[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, arr, row in tensors:
        header[name] = {"dtype": row[1], "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    total = 8 + len(raw) + off
    if out is None or len(out) != total:
        out = bytearray(total)
    out[:8] = struct.pack("<Q", len(raw))
    out[8:8 + len(raw)] = raw
    base = 8 + len(raw)
    for name, arr, _ in tensors:
        lo, hi = header[name]["data_offsets"]
        if hi > lo:
            np.frombuffer(out, dtype=np.uint8, count=hi - lo, offset=base + lo)[:] = arr.reshape(-1).view(np.uint8)
    return out


def unpack_state(buf: bytearray | memoryview, as_torch: bool = True) -> dict[str, Any]:
    """Tensors viewing ``buf`` (no copy; valid while ``buf`` is unchanged): torch tensors, or numpy
    arrays without ``as_torch`` (a BF16 entry then is its int16 bit pattern). Raises WeightsFormatError
    naming what is wrong with a malformed payload."""
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
    out: dict[str, Any] = {}
    for name, info in header.items():
        try:
            row = _BY_CODE[info["dtype"]]
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
        item = row[4]
        if not 0 <= lo <= hi <= size or hi - lo != count * item:
            raise WeightsFormatError(f"tensor {name!r}: data_offsets [{lo}, {hi}] do not hold {shape} "
                                     f"{info['dtype']} within {size} data bytes")
        spans.append((lo, hi, name))
        aligned = count and (base + lo) % item == 0
        if as_torch:
            torch = _torch()
            dt = getattr(torch, row[3])
            if not count:
                out[name] = torch.empty(shape, dtype=dt)
            elif aligned:
                out[name] = torch.frombuffer(buf, dtype=dt, count=count, offset=base + lo).view(shape)
            else:  # unaligned (another writer's layout): copy this one
                raw = torch.frombuffer(bytearray(mv[base + lo: base + hi]), dtype=torch.uint8)
                out[name] = raw.view(dt).view(shape)
        else:
            raw_dt = np.dtype(row[2] if row[2] is not None else np.int16)
            if aligned:
                out[name] = np.frombuffer(buf, dtype=raw_dt, count=count, offset=base + lo).reshape(shape)
            else:
                out[name] = np.frombuffer(bytes(mv[base + lo: base + hi]), dtype=raw_dt).reshape(shape).copy()
    spans.sort()
    end = 0
    for lo, hi, name in spans:
        if lo != end:
            raise WeightsFormatError(f"tensor {name!r} starts at {lo}, expected {end} (overlap or hole)")
        end = hi
    if end != size:
        raise WeightsFormatError(f"tensors cover {end} of {size} data bytes")
    return out
