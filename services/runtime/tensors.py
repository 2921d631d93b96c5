"""Tensors on the wire: raw little-endian bytes + dtype + shape (never repeated floats)."""

from __future__ import annotations

import sys

import numpy as np
import torch

from chatrl.services.proto.chatrl.v1 import common_pb2

_TORCH = {
    common_pb2.DTYPE_FLOAT32: torch.float32, common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    common_pb2.DTYPE_FLOAT16: torch.float16, common_pb2.DTYPE_FLOAT64: torch.float64,
    common_pb2.DTYPE_INT8: torch.int8, common_pb2.DTYPE_UINT8: torch.uint8, common_pb2.DTYPE_INT16: torch.int16,
    common_pb2.DTYPE_INT32: torch.int32, common_pb2.DTYPE_INT64: torch.int64, common_pb2.DTYPE_BOOL: torch.bool,
}
_PROTO = {v: k for k, v in _TORCH.items()}


class TensorDecodeError(ValueError):
    pass


def to_proto(t: torch.Tensor | np.ndarray | list) -> common_pb2.Tensor:
    if not torch.is_tensor(t):
        t = torch.as_tensor(np.asarray(t))
    t = t.detach().cpu().contiguous()
    if t.dtype not in _PROTO:
        raise TypeError(f"unsupported dtype {t.dtype}")
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    arr = raw.numpy()
    if sys.byteorder != "little":
        arr = arr.byteswap()
    return common_pb2.Tensor(data=arr.tobytes(), dtype=_PROTO[t.dtype], shape=list(t.shape))


def from_proto(msg: common_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    if msg.dtype not in _TORCH:
        raise TensorDecodeError(f"{field}.dtype: unsupported or unspecified dtype {msg.dtype}")
    dt = _TORCH[msg.dtype]
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise TensorDecodeError(f"{field}.shape: negative dimension in {shape}")
    n = int(np.prod(shape)) if shape else 1
    itemsize = torch.empty((), dtype=dt).element_size()
    if len(msg.data) != n * itemsize:
        raise TensorDecodeError(f"{field}.data: {len(msg.data)} bytes, expected {n * itemsize} for shape "
                                f"{shape} of {dt}")
    np_dt = np.int16 if dt == torch.bfloat16 else torch.empty((), dtype=dt).numpy().dtype
    arr = np.frombuffer(msg.data, dtype=np.dtype(np_dt).newbyteorder("<")).reshape(shape).copy()
    t = torch.from_numpy(arr.astype(np.dtype(np_dt).newbyteorder("=")))
    return t.view(torch.bfloat16) if dt == torch.bfloat16 else t
