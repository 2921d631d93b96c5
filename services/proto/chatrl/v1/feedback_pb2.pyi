import datetime

from chatrl.services.proto.chatrl.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESPONSE_FLAG_UNSPECIFIED: _ClassVar[ResponseFlag]
    RESPONSE_FLAG_FAILS_INSTRUCTION: _ClassVar[ResponseFlag]
    RESPONSE_FLAG_MADE_UP_FACTS: _ClassVar[ResponseFlag]
    RESPONSE_FLAG_HARMFUL: _ClassVar[ResponseFlag]
    RESPONSE_FLAG_UNFINISHED: _ClassVar[ResponseFlag]

class ExportKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_KIND_UNSPECIFIED: _ClassVar[ExportKind]
    EXPORT_KIND_RANKINGS: _ClassVar[ExportKind]
    EXPORT_KIND_DEMONSTRATIONS: _ClassVar[ExportKind]
    EXPORT_KIND_PROMPTS: _ClassVar[ExportKind]
    EXPORT_KIND_PAIRS: _ClassVar[ExportKind]
RESPONSE_FLAG_UNSPECIFIED: ResponseFlag
RESPONSE_FLAG_FAILS_INSTRUCTION: ResponseFlag
RESPONSE_FLAG_MADE_UP_FACTS: ResponseFlag
RESPONSE_FLAG_HARMFUL: ResponseFlag
RESPONSE_FLAG_UNFINISHED: ResponseFlag
EXPORT_KIND_UNSPECIFIED: ExportKind
EXPORT_KIND_RANKINGS: ExportKind
EXPORT_KIND_DEMONSTRATIONS: ExportKind
EXPORT_KIND_PROMPTS: ExportKind
EXPORT_KIND_PAIRS: ExportKind

class NewPrompt(_message.Message):
    __slots__ = ("text", "source")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    source: str
    def __init__(self, text: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class AddPromptsRequest(_message.Message):
    __slots__ = ("prompts",)
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[NewPrompt]
    def __init__(self, prompts: _Optional[_Iterable[_Union[NewPrompt, _Mapping]]] = ...) -> None: ...

class AddPromptsResponse(_message.Message):
    __slots__ = ("prompt_ids", "added")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[str]
    added: int
    def __init__(self, prompt_ids: _Optional[_Iterable[str]] = ..., added: _Optional[int] = ...) -> None: ...

class CreateComparisonTasksRequest(_message.Message):
    __slots__ = ("prompts", "prompt_ids", "k", "sampling", "request_id", "conversations")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATIONS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompt_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    sampling: _common_pb2.SamplingParams
    request_id: str
    conversations: _containers.RepeatedCompositeFieldContainer[_common_pb2.Conversation]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., prompt_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., conversations: _Optional[_Iterable[_Union[_common_pb2.Conversation, _Mapping]]] = ...) -> None: ...

class CreateComparisonTasksResponse(_message.Message):
    __slots__ = ("task_ids", "policy_model_version")
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    POLICY_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    policy_model_version: int
    def __init__(self, task_ids: _Optional[_Iterable[str]] = ..., policy_model_version: _Optional[int] = ...) -> None: ...

class ComparisonTask(_message.Message):
    __slots__ = ("task_id", "prompt_id", "prompt", "responses", "policy_model_version", "created_at", "lease_expires_at", "responses_finished", "conversation")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    POLICY_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FINISHED_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    prompt_id: str
    prompt: str
    responses: _containers.RepeatedScalarFieldContainer[str]
    policy_model_version: int
    created_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    responses_finished: _containers.RepeatedScalarFieldContainer[bool]
    conversation: _common_pb2.Conversation
    def __init__(self, task_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., responses: _Optional[_Iterable[str]] = ..., policy_model_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., responses_finished: _Optional[_Iterable[bool]] = ..., conversation: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ...) -> None: ...

class NextTaskRequest(_message.Message):
    __slots__ = ("labeler_id",)
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    labeler_id: str
    def __init__(self, labeler_id: _Optional[str] = ...) -> None: ...

class NextTaskResponse(_message.Message):
    __slots__ = ("task", "remaining")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    task: ComparisonTask
    remaining: int
    def __init__(self, task: _Optional[_Union[ComparisonTask, _Mapping]] = ..., remaining: _Optional[int] = ...) -> None: ...

class SubmitRankingRequest(_message.Message):
    __slots__ = ("submission_id", "task_id", "labeler_id", "ranking", "tied_with_next", "assessments")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    TIED_WITH_NEXT_FIELD_NUMBER: _ClassVar[int]
    ASSESSMENTS_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    task_id: str
    labeler_id: str
    ranking: _containers.RepeatedScalarFieldContainer[int]
    tied_with_next: _containers.RepeatedScalarFieldContainer[bool]
    assessments: _containers.RepeatedCompositeFieldContainer[ResponseAssessment]
    def __init__(self, submission_id: _Optional[str] = ..., task_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., ranking: _Optional[_Iterable[int]] = ..., tied_with_next: _Optional[_Iterable[bool]] = ..., assessments: _Optional[_Iterable[_Union[ResponseAssessment, _Mapping]]] = ...) -> None: ...

class ResponseAssessment(_message.Message):
    __slots__ = ("rating", "flags")
    RATING_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    rating: int
    flags: _containers.RepeatedScalarFieldContainer[ResponseFlag]
    def __init__(self, rating: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[ResponseFlag, str]]] = ...) -> None: ...

class SkipTaskRequest(_message.Message):
    __slots__ = ("submission_id", "task_id", "labeler_id", "reason")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    task_id: str
    labeler_id: str
    reason: str
    def __init__(self, submission_id: _Optional[str] = ..., task_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SkipTaskResponse(_message.Message):
    __slots__ = ("skip_id", "duplicate")
    SKIP_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    skip_id: str
    duplicate: bool
    def __init__(self, skip_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitRankingResponse(_message.Message):
    __slots__ = ("ranking_id", "duplicate", "pairs")
    RANKING_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    ranking_id: str
    duplicate: bool
    pairs: int
    def __init__(self, ranking_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., pairs: _Optional[int] = ...) -> None: ...

class SubmitDemonstrationRequest(_message.Message):
    __slots__ = ("submission_id", "labeler_id", "messages")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    labeler_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, submission_id: _Optional[str] = ..., labeler_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class SubmitDemonstrationResponse(_message.Message):
    __slots__ = ("demonstration_id", "duplicate")
    DEMONSTRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    demonstration_id: str
    duplicate: bool
    def __init__(self, demonstration_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("kind", "since", "limit", "after_sequence", "wait_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: ExportKind
    since: _timestamp_pb2.Timestamp
    limit: int
    after_sequence: int
    wait_seconds: float
    def __init__(self, kind: _Optional[_Union[ExportKind, str]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ..., after_sequence: _Optional[int] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("lines", "next_after_sequence")
    LINES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    next_after_sequence: int
    def __init__(self, lines: _Optional[_Iterable[str]] = ..., next_after_sequence: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("prompts", "open_tasks", "tasks", "rankings", "demonstrations", "rankings_sequence", "skips", "agreement", "labelers", "leased_tasks", "active_labelers")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    OPEN_TASKS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATIONS_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SKIPS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LABELERS_FIELD_NUMBER: _ClassVar[int]
    LEASED_TASKS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LABELERS_FIELD_NUMBER: _ClassVar[int]
    prompts: int
    open_tasks: int
    tasks: int
    rankings: int
    demonstrations: int
    rankings_sequence: int
    skips: int
    agreement: Agreement
    labelers: _containers.RepeatedCompositeFieldContainer[LabelerAgreement]
    leased_tasks: int
    active_labelers: int
    def __init__(self, prompts: _Optional[int] = ..., open_tasks: _Optional[int] = ..., tasks: _Optional[int] = ..., rankings: _Optional[int] = ..., demonstrations: _Optional[int] = ..., rankings_sequence: _Optional[int] = ..., skips: _Optional[int] = ..., agreement: _Optional[_Union[Agreement, _Mapping]] = ..., labelers: _Optional[_Iterable[_Union[LabelerAgreement, _Mapping]]] = ..., leased_tasks: _Optional[int] = ..., active_labelers: _Optional[int] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("compared", "pairwise", "kendall_tau")
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    PAIRWISE_FIELD_NUMBER: _ClassVar[int]
    KENDALL_TAU_FIELD_NUMBER: _ClassVar[int]
    compared: int
    pairwise: float
    kendall_tau: float
    def __init__(self, compared: _Optional[int] = ..., pairwise: _Optional[float] = ..., kendall_tau: _Optional[float] = ...) -> None: ...

class LabelerAgreement(_message.Message):
    __slots__ = ("labeler_id", "agreement")
    LABELER_ID_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    labeler_id: str
    agreement: Agreement
    def __init__(self, labeler_id: _Optional[str] = ..., agreement: _Optional[_Union[Agreement, _Mapping]] = ...) -> None: ...
