"""Tensors on the wire, torch side: the codec lives beside the contract (:mod:`chatrl.services.proto.codecs`,
numpy-first so clients need no torch); the services and the trainer decode to torch tensors."""

from __future__ import annotations

from chatrl.services.proto.codecs import TensorDecodeError, tensor_from_proto, tensor_to_proto

__all__ = ["TensorDecodeError", "from_proto", "to_proto"]

to_proto = tensor_to_proto


def from_proto(msg, field: str = "tensor"):
    """``chatrl.v1.Tensor`` → torch tensor of its wire dtype."""
    return tensor_from_proto(msg, field, as_torch=True)
