"""Every proto enum ⇄ its config / CLI / JSON string, built from the enum descriptors (hand-written;
``make proto`` never touches this file).

A value's string is its name without the enum's prefix, lower-cased (``FINISH_REASON_STOP`` → ``"stop"``),
except where the rest of the system already spells it otherwise: the ``reward`` stage
(``STAGE_REWARD_MODEL``; ``reward_model`` is accepted too) and run states, which the trainer records
upper-case (``RUN_STATE_PENDING`` → ``"PENDING"``). The ``*_UNSPECIFIED`` zero value is ``""``.

    STAGE.value("reward")                    # trainer_pb2.STAGE_REWARD_MODEL
    FINISH_REASON.name(c.finish_reason)      # "stop"
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.descriptor import EnumDescriptor

from chatrl.services.proto.chatrl.v1 import common_pb2, feedback_pb2, trainer_pb2


class UnknownEnumError(ValueError):
    """A string or number that is no value of the enum; the message lists the valid ones."""


class EnumMap:
    """One proto enum ⇄ strings. ``rename``: value name (without prefix) → string, where the default
    (lower-case) is not it; ``aliases``: more accepted spellings; ``case``: how a name becomes its string."""

    def __init__(self, descriptor: EnumDescriptor, prefix: str, *, rename: dict[str, str] | None = None,
                 aliases: dict[str, str] | None = None, case: Callable[[str], str] = str.lower) -> None:
        self.descriptor = descriptor
        self.label = descriptor.name
        self._by_number: dict[int, str] = {}
        for v in descriptor.values:
            short = v.name.removeprefix(prefix)
            unspecified = v.number == 0 and short == "UNSPECIFIED"
            self._by_number[v.number] = "" if unspecified else (rename or {}).get(short, case(short))
        self._by_string = {s: n for n, s in self._by_number.items()}
        for alias, short in (aliases or {}).items():
            self._by_string[alias] = descriptor.values_by_name[prefix + short].number
        self._case = case

    @property
    def names(self) -> tuple[str, ...]:
        """The strings of every specified value, in proto order."""
        return tuple(s for s in self._by_number.values() if s)

    def value(self, name: str) -> int:
        """The enum number of ``name`` (case-insensitive); UnknownEnumError for anything else."""
        key = name if name in self._by_string else self._case(name)
        if key not in self._by_string:
            raise UnknownEnumError(f"unknown {self.label} {name!r} (expected one of {', '.join(self.names)})")
        return self._by_string[key]

    def name(self, number: int) -> str:
        """The string of enum number ``number``; UnknownEnumError for a number the proto does not define."""
        if number not in self._by_number:
            raise UnknownEnumError(f"unknown {self.label} value {number} (expected one of "
                                   + ", ".join(f"{n} ({s or 'unspecified'})" for n, s in self._by_number.items())
                                   + ")")
        return self._by_number[number]


STAGE = EnumMap(trainer_pb2.Stage.DESCRIPTOR, "STAGE_", rename={"REWARD_MODEL": "reward"},
                aliases={"reward_model": "REWARD_MODEL"})
RUN_STATE = EnumMap(trainer_pb2.RunState.DESCRIPTOR, "RUN_STATE_", case=str.upper)
FINISH_REASON = EnumMap(common_pb2.FinishReason.DESCRIPTOR, "FINISH_REASON_")
ROLE = EnumMap(common_pb2.Role.DESCRIPTOR, "ROLE_")
DTYPE = EnumMap(common_pb2.Dtype.DESCRIPTOR, "DTYPE_")
EXPORT_KIND = EnumMap(feedback_pb2.ExportKind.DESCRIPTOR, "EXPORT_KIND_")
RESPONSE_FLAG = EnumMap(feedback_pb2.ResponseFlag.DESCRIPTOR, "RESPONSE_FLAG_")  # the store's flag names

ALL = (STAGE, RUN_STATE, FINISH_REASON, ROLE, DTYPE, EXPORT_KIND, RESPONSE_FLAG)
