"""Weights on the wire: the codec lives beside the contract (:mod:`chatrl.services.proto.codecs`); this name
stays for the server-side callers."""

from chatrl.services.proto.codecs import MAX_HEADER, WeightsFormatError, pack_state, unpack_state

__all__ = ["MAX_HEADER", "WeightsFormatError", "pack_state", "unpack_state"]
