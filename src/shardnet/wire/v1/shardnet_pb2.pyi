from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "span", "protocol_version", "shardnet_version", "dtype", "max_message_bytes", "max_batch_size", "max_length", "cache_tokens_total", "cache_tokens_free", "open_sessions", "hidden_size", "sessions_served", "state", "quant", "decode_batches", "decode_steps_batched", "prefix_hits", "prefix_tokens_reused", "prefix_cache_tokens_used", "prefix_cache_tokens_total", "arrived_at_s", "replied_at_s")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARDNET_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FREE_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_SERVED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCHES_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_BATCHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_AT_S_FIELD_NUMBER: _ClassVar[int]
    REPLIED_AT_S_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    span: Span
    protocol_version: str
    shardnet_version: str
    dtype: str
    max_message_bytes: int
    max_batch_size: int
    max_length: int
    cache_tokens_total: int
    cache_tokens_free: int
    open_sessions: int
    hidden_size: int
    sessions_served: int
    state: str
    quant: str
    decode_batches: int
    decode_steps_batched: int
    prefix_hits: int
    prefix_tokens_reused: int
    prefix_cache_tokens_used: int
    prefix_cache_tokens_total: int
    arrived_at_s: float
    replied_at_s: float
    def __init__(self, model_id: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., protocol_version: _Optional[str] = ..., shardnet_version: _Optional[str] = ..., dtype: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., cache_tokens_total: _Optional[int] = ..., cache_tokens_free: _Optional[int] = ..., open_sessions: _Optional[int] = ..., hidden_size: _Optional[int] = ..., sessions_served: _Optional[int] = ..., state: _Optional[str] = ..., quant: _Optional[str] = ..., decode_batches: _Optional[int] = ..., decode_steps_batched: _Optional[int] = ..., prefix_hits: _Optional[int] = ..., prefix_tokens_reused: _Optional[int] = ..., prefix_cache_tokens_used: _Optional[int] = ..., prefix_cache_tokens_total: _Optional[int] = ..., arrived_at_s: _Optional[float] = ..., replied_at_s: _Optional[float] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "span", "hidden_states", "attention_mask", "position_ids", "prompts", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    span: Span
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    prompts: Tensor
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden_states", "compute_s")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    hidden_states: Tensor
    compute_s: float
    def __init__(self, hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model_id", "span", "hidden_states", "grad_outputs", "attention_mask", "position_ids", "update_weights", "prompts", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    span: Span
    hidden_states: Tensor
    grad_outputs: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    update_weights: bool
    prompts: Tensor
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., grad_outputs: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., update_weights: _Optional[bool] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_inputs", "compute_s", "grad_prompts")
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    GRAD_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    grad_inputs: Tensor
    compute_s: float
    grad_prompts: Tensor
    def __init__(self, grad_inputs: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ..., grad_prompts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "await_push")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    AWAIT_PUSH_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    await_push: AwaitPush
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., await_push: _Optional[_Union[AwaitPush, _Mapping]] = ...) -> None: ...

class AwaitPush(_message.Message):
    __slots__ = ("step_id",)
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    def __init__(self, step_id: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "span", "max_length", "batch_size", "session_id", "adopt_token", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ADOPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    span: Span
    max_length: int
    batch_size: int
    session_id: str
    adopt_token: bytes
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., session_id: _Optional[str] = ..., adopt_token: _Optional[bytes] = ..., adapter: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "position", "hidden_states", "attention_mask", "position_ids", "hypo_ids", "push")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    HYPO_IDS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    position: int
    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    hypo_ids: Tensor
    push: _containers.RepeatedCompositeFieldContainer[NextHop]
    def __init__(self, step_id: _Optional[int] = ..., position: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., hypo_ids: _Optional[_Union[Tensor, _Mapping]] = ..., push: _Optional[_Iterable[_Union[NextHop, _Mapping]]] = ...) -> None: ...

class NextHop(_message.Message):
    __slots__ = ("address", "push_token", "step_id", "position", "hypo_ids")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HYPO_IDS_FIELD_NUMBER: _ClassVar[int]
    address: str
    push_token: bytes
    step_id: int
    position: int
    hypo_ids: Tensor
    def __init__(self, address: _Optional[str] = ..., push_token: _Optional[bytes] = ..., step_id: _Optional[int] = ..., position: _Optional[int] = ..., hypo_ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("push_token", "step", "abort")
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    push_token: bytes
    step: Step
    abort: str
    def __init__(self, push_token: _Optional[bytes] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., abort: _Optional[str] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("arrived_at_s",)
    ARRIVED_AT_S_FIELD_NUMBER: _ClassVar[int]
    arrived_at_s: float
    def __init__(self, arrived_at_s: _Optional[float] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "step")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    step: StepResult
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., step: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "cache_tokens", "push_token", "arrived_at_s", "replied_at_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_AT_S_FIELD_NUMBER: _ClassVar[int]
    REPLIED_AT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    cache_tokens: int
    push_token: bytes
    arrived_at_s: float
    replied_at_s: float
    def __init__(self, session_id: _Optional[str] = ..., cache_tokens: _Optional[int] = ..., push_token: _Optional[bytes] = ..., arrived_at_s: _Optional[float] = ..., replied_at_s: _Optional[float] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "hidden_states", "compute_s", "position", "handle_s", "push_error", "moved", "queue_s", "send_s", "push_s", "push_one_way_s", "arrived_at_s", "replied_at_s")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HANDLE_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_ERROR_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    SEND_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_S_FIELD_NUMBER: _ClassVar[int]
    PUSH_ONE_WAY_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_AT_S_FIELD_NUMBER: _ClassVar[int]
    REPLIED_AT_S_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden_states: Tensor
    compute_s: float
    position: int
    handle_s: float
    push_error: str
    moved: Moved
    queue_s: float
    send_s: float
    push_s: float
    push_one_way_s: float
    arrived_at_s: float
    replied_at_s: float
    def __init__(self, step_id: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ..., position: _Optional[int] = ..., handle_s: _Optional[float] = ..., push_error: _Optional[str] = ..., moved: _Optional[_Union[Moved, _Mapping]] = ..., queue_s: _Optional[float] = ..., send_s: _Optional[float] = ..., push_s: _Optional[float] = ..., push_one_way_s: _Optional[float] = ..., arrived_at_s: _Optional[float] = ..., replied_at_s: _Optional[float] = ...) -> None: ...

class Moved(_message.Message):
    __slots__ = ("address", "peer_id", "adopt_token")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADOPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    address: str
    peer_id: str
    adopt_token: bytes
    def __init__(self, address: _Optional[str] = ..., peer_id: _Optional[str] = ..., adopt_token: _Optional[bytes] = ...) -> None: ...

class AdoptRequest(_message.Message):
    __slots__ = ("open", "position", "attention_mask", "layer", "keys", "values", "seen")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    position: int
    attention_mask: Tensor
    layer: int
    keys: Tensor
    values: Tensor
    seen: int
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., position: _Optional[int] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., layer: _Optional[int] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., seen: _Optional[int] = ...) -> None: ...

class AdoptReply(_message.Message):
    __slots__ = ("adopt_token",)
    ADOPT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adopt_token: bytes
    def __init__(self, adopt_token: _Optional[bytes] = ...) -> None: ...
