from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    LEASE_STATE_STARTING: _ClassVar[LeaseState]
    LEASE_STATE_ACTIVE: _ClassVar[LeaseState]
    LEASE_STATE_PREEMPTING: _ClassVar[LeaseState]
    LEASE_STATE_RELEASED: _ClassVar[LeaseState]
    LEASE_STATE_EXPIRED: _ClassVar[LeaseState]
    LEASE_STATE_REVOKED: _ClassVar[LeaseState]
    LEASE_STATE_PREEMPTED: _ClassVar[LeaseState]
    LEASE_STATE_FAILED: _ClassVar[LeaseState]
LEASE_STATE_UNSPECIFIED: LeaseState
LEASE_STATE_STARTING: LeaseState
LEASE_STATE_ACTIVE: LeaseState
LEASE_STATE_PREEMPTING: LeaseState
LEASE_STATE_RELEASED: LeaseState
LEASE_STATE_EXPIRED: LeaseState
LEASE_STATE_REVOKED: LeaseState
LEASE_STATE_PREEMPTED: LeaseState
LEASE_STATE_FAILED: LeaseState

class SliceSpec(_message.Message):
    __slots__ = ("memory_bytes", "fraction", "gpus")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    fraction: float
    gpus: int
    def __init__(self, memory_bytes: _Optional[int] = ..., fraction: _Optional[float] = ..., gpus: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("user", "kernel_id", "slice", "wait_seconds", "client_host", "move_from", "move_token", "resume_request_id")
    USER_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    MOVE_FROM_FIELD_NUMBER: _ClassVar[int]
    MOVE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user: str
    kernel_id: str
    slice: SliceSpec
    wait_seconds: float
    client_host: str
    move_from: str
    move_token: str
    resume_request_id: str
    def __init__(self, user: _Optional[str] = ..., kernel_id: _Optional[str] = ..., slice: _Optional[_Union[SliceSpec, _Mapping]] = ..., wait_seconds: _Optional[float] = ..., client_host: _Optional[str] = ..., move_from: _Optional[str] = ..., move_token: _Optional[str] = ..., resume_request_id: _Optional[str] = ...) -> None: ...

class QueuePosition(_message.Message):
    __slots__ = ("position", "queue_length", "estimated_wait_seconds", "reason", "request_id")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    position: int
    queue_length: int
    estimated_wait_seconds: float
    reason: str
    request_id: str
    def __init__(self, position: _Optional[int] = ..., queue_length: _Optional[int] = ..., estimated_wait_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "user", "kernel_id", "token", "host", "device_ids", "device_name", "slice", "memory_bytes", "worker_endpoint", "requested_at", "granted_at", "expires_at", "ttl_seconds", "state", "end_reason", "ended_at", "busy_seconds", "idle_release_at", "priority", "preempt_deadline", "gpu_busy_seconds", "gpu_memory_used_bytes", "sm_percent", "worker_tls_root", "default_idle_seconds", "max_idle_seconds", "mirror_bytes", "mirror_file_bytes", "forward_env", "forward_env_set", "idle_seconds", "auto_mode", "broker_decision_s", "worker_start_s", "broker_total_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_RELEASE_AT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREEMPT_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    GPU_BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SM_PERCENT_FIELD_NUMBER: _ClassVar[int]
    WORKER_TLS_ROOT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ENV_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ENV_SET_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTO_MODE_FIELD_NUMBER: _ClassVar[int]
    BROKER_DECISION_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_START_S_FIELD_NUMBER: _ClassVar[int]
    BROKER_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    user: str
    kernel_id: str
    token: str
    host: str
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    device_name: str
    slice: SliceSpec
    memory_bytes: int
    worker_endpoint: str
    requested_at: float
    granted_at: float
    expires_at: float
    ttl_seconds: float
    state: str
    end_reason: str
    ended_at: float
    busy_seconds: float
    idle_release_at: float
    priority: int
    preempt_deadline: float
    gpu_busy_seconds: float
    gpu_memory_used_bytes: int
    sm_percent: float
    worker_tls_root: bytes
    default_idle_seconds: float
    max_idle_seconds: float
    mirror_bytes: int
    mirror_file_bytes: int
    forward_env: _containers.RepeatedScalarFieldContainer[str]
    forward_env_set: bool
    idle_seconds: float
    auto_mode: bool
    broker_decision_s: float
    worker_start_s: float
    broker_total_s: float
    def __init__(self, lease_id: _Optional[str] = ..., user: _Optional[str] = ..., kernel_id: _Optional[str] = ..., token: _Optional[str] = ..., host: _Optional[str] = ..., device_ids: _Optional[_Iterable[str]] = ..., device_name: _Optional[str] = ..., slice: _Optional[_Union[SliceSpec, _Mapping]] = ..., memory_bytes: _Optional[int] = ..., worker_endpoint: _Optional[str] = ..., requested_at: _Optional[float] = ..., granted_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., ttl_seconds: _Optional[float] = ..., state: _Optional[str] = ..., end_reason: _Optional[str] = ..., ended_at: _Optional[float] = ..., busy_seconds: _Optional[float] = ..., idle_release_at: _Optional[float] = ..., priority: _Optional[int] = ..., preempt_deadline: _Optional[float] = ..., gpu_busy_seconds: _Optional[float] = ..., gpu_memory_used_bytes: _Optional[int] = ..., sm_percent: _Optional[float] = ..., worker_tls_root: _Optional[bytes] = ..., default_idle_seconds: _Optional[float] = ..., max_idle_seconds: _Optional[float] = ..., mirror_bytes: _Optional[int] = ..., mirror_file_bytes: _Optional[int] = ..., forward_env: _Optional[_Iterable[str]] = ..., forward_env_set: _Optional[bool] = ..., idle_seconds: _Optional[float] = ..., auto_mode: _Optional[bool] = ..., broker_decision_s: _Optional[float] = ..., worker_start_s: _Optional[float] = ..., broker_total_s: _Optional[float] = ...) -> None: ...

class AttachEvent(_message.Message):
    __slots__ = ("queued", "granted")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    queued: QueuePosition
    granted: Lease
    def __init__(self, queued: _Optional[_Union[QueuePosition, _Mapping]] = ..., granted: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class LeaseRef(_message.Message):
    __slots__ = ("lease_id", "token", "reason", "busy_seconds", "idle_release_in", "on_behalf_of", "migrating", "idle_seconds", "auto_mode", "memory_used_bytes", "cell_running", "can_move")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_RELEASE_IN_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_OF_FIELD_NUMBER: _ClassVar[int]
    MIGRATING_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTO_MODE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CELL_RUNNING_FIELD_NUMBER: _ClassVar[int]
    CAN_MOVE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    reason: str
    busy_seconds: float
    idle_release_in: float
    on_behalf_of: str
    migrating: bool
    idle_seconds: float
    auto_mode: bool
    memory_used_bytes: int
    cell_running: bool
    can_move: bool
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ..., reason: _Optional[str] = ..., busy_seconds: _Optional[float] = ..., idle_release_in: _Optional[float] = ..., on_behalf_of: _Optional[str] = ..., migrating: _Optional[bool] = ..., idle_seconds: _Optional[float] = ..., auto_mode: _Optional[bool] = ..., memory_used_bytes: _Optional[int] = ..., cell_running: _Optional[bool] = ..., can_move: _Optional[bool] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("host", "undrain")
    HOST_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    host: str
    undrain: bool
    def __init__(self, host: _Optional[str] = ..., undrain: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("devices", "active_leases")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    devices: int
    active_leases: int
    def __init__(self, devices: _Optional[int] = ..., active_leases: _Optional[int] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("since", "lease_id", "user")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    since: float
    lease_id: str
    user: str
    def __init__(self, since: _Optional[float] = ..., lease_id: _Optional[str] = ..., user: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("ts", "lease_id", "user", "kind", "detail")
    TS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ts: float
    lease_id: str
    user: str
    kind: str
    detail: str
    def __init__(self, ts: _Optional[float] = ..., lease_id: _Optional[str] = ..., user: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class EventsReply(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class KernelIdleRequest(_message.Message):
    __slots__ = ("user", "kernel_id", "idle_seconds")
    USER_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user: str
    kernel_id: str
    idle_seconds: float
    def __init__(self, user: _Optional[str] = ..., kernel_id: _Optional[str] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class KernelIdleReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: int
    def __init__(self, leases: _Optional[int] = ...) -> None: ...

class RenewReply(_message.Message):
    __slots__ = ("expires_at", "state", "end_reason", "idle_seconds", "move_to", "move_reason")
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOVE_TO_FIELD_NUMBER: _ClassVar[int]
    MOVE_REASON_FIELD_NUMBER: _ClassVar[int]
    expires_at: float
    state: str
    end_reason: str
    idle_seconds: float
    move_to: str
    move_reason: str
    def __init__(self, expires_at: _Optional[float] = ..., state: _Optional[str] = ..., end_reason: _Optional[str] = ..., idle_seconds: _Optional[float] = ..., move_to: _Optional[str] = ..., move_reason: _Optional[str] = ...) -> None: ...

class LeaseNotice(_message.Message):
    __slots__ = ("state", "reason", "move_to")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MOVE_TO_FIELD_NUMBER: _ClassVar[int]
    state: str
    reason: str
    move_to: str
    def __init__(self, state: _Optional[str] = ..., reason: _Optional[str] = ..., move_to: _Optional[str] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("held_seconds",)
    HELD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    held_seconds: float
    def __init__(self, held_seconds: _Optional[float] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("user", "include_ended")
    USER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ENDED_FIELD_NUMBER: _ClassVar[int]
    user: str
    include_ended: bool
    def __init__(self, user: _Optional[str] = ..., include_ended: _Optional[bool] = ...) -> None: ...

class ListLeasesReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class PoolStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("device_id", "host", "name", "kind", "memory_bytes", "allocated_bytes", "allocated_fraction", "leases", "online", "exclusive", "draining")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    host: str
    name: str
    kind: str
    memory_bytes: int
    allocated_bytes: int
    allocated_fraction: float
    leases: int
    online: bool
    exclusive: bool
    draining: bool
    def __init__(self, device_id: _Optional[str] = ..., host: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., allocated_fraction: _Optional[float] = ..., leases: _Optional[int] = ..., online: _Optional[bool] = ..., exclusive: _Optional[bool] = ..., draining: _Optional[bool] = ...) -> None: ...

class QueuedRequest(_message.Message):
    __slots__ = ("user", "kernel_id", "position", "estimated_wait_seconds")
    USER_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    user: str
    kernel_id: str
    position: int
    estimated_wait_seconds: float
    def __init__(self, user: _Optional[str] = ..., kernel_id: _Optional[str] = ..., position: _Optional[int] = ..., estimated_wait_seconds: _Optional[float] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("devices", "queue_length", "active_leases", "agents_online", "queue")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    AGENTS_ONLINE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    queue_length: int
    active_leases: int
    agents_online: int
    queue: _containers.RepeatedCompositeFieldContainer[QueuedRequest]
    def __init__(self, devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ..., queue_length: _Optional[int] = ..., active_leases: _Optional[int] = ..., agents_online: _Optional[int] = ..., queue: _Optional[_Iterable[_Union[QueuedRequest, _Mapping]]] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "name", "kind", "memory_bytes", "uuid")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    name: str
    kind: str
    memory_bytes: int
    uuid: str
    def __init__(self, device_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., uuid: _Optional[str] = ...) -> None: ...

class LiveLease(_message.Message):
    __slots__ = ("lease_id", "worker_endpoint", "pid")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    worker_endpoint: str
    pid: int
    def __init__(self, lease_id: _Optional[str] = ..., worker_endpoint: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("host", "agent_id", "devices", "live_leases", "warm_workers", "version", "worker_tls_root", "lease_key")
    HOST_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    WARM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_TLS_ROOT_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEY_FIELD_NUMBER: _ClassVar[int]
    host: str
    agent_id: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    live_leases: _containers.RepeatedCompositeFieldContainer[LiveLease]
    warm_workers: int
    version: str
    worker_tls_root: bytes
    lease_key: bytes
    def __init__(self, host: _Optional[str] = ..., agent_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., live_leases: _Optional[_Iterable[_Union[LiveLease, _Mapping]]] = ..., warm_workers: _Optional[int] = ..., version: _Optional[str] = ..., worker_tls_root: _Optional[bytes] = ..., lease_key: _Optional[bytes] = ...) -> None: ...

class AgentHeartbeat(_message.Message):
    __slots__ = ("warm_workers", "cached_users", "usage")
    WARM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_USERS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    warm_workers: int
    cached_users: _containers.RepeatedScalarFieldContainer[str]
    usage: _containers.RepeatedCompositeFieldContainer[LeaseUsage]
    def __init__(self, warm_workers: _Optional[int] = ..., cached_users: _Optional[_Iterable[str]] = ..., usage: _Optional[_Iterable[_Union[LeaseUsage, _Mapping]]] = ...) -> None: ...

class LeaseUsage(_message.Message):
    __slots__ = ("lease_id", "memory_bytes", "sm_percent", "busy_seconds", "sm_seconds", "sampled_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SM_PERCENT_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    memory_bytes: int
    sm_percent: float
    busy_seconds: float
    sm_seconds: float
    sampled_at: float
    def __init__(self, lease_id: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., sm_percent: _Optional[float] = ..., busy_seconds: _Optional[float] = ..., sm_seconds: _Optional[float] = ..., sampled_at: _Optional[float] = ...) -> None: ...

class LeaseStarted(_message.Message):
    __slots__ = ("lease_id", "worker_endpoint", "pid", "worker_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    worker_endpoint: str
    pid: int
    worker_id: str
    def __init__(self, lease_id: _Optional[str] = ..., worker_endpoint: _Optional[str] = ..., pid: _Optional[int] = ..., worker_id: _Optional[str] = ...) -> None: ...

class LeaseFailed(_message.Message):
    __slots__ = ("lease_id", "error")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    error: str
    def __init__(self, lease_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class LeaseEnded(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaseStopped(_message.Message):
    __slots__ = ("lease_id", "detail")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    detail: str
    def __init__(self, lease_id: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "started", "failed", "ended", "stopped")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    heartbeat: AgentHeartbeat
    started: LeaseStarted
    failed: LeaseFailed
    ended: LeaseEnded
    stopped: LeaseStopped
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., heartbeat: _Optional[_Union[AgentHeartbeat, _Mapping]] = ..., started: _Optional[_Union[LeaseStarted, _Mapping]] = ..., failed: _Optional[_Union[LeaseFailed, _Mapping]] = ..., ended: _Optional[_Union[LeaseEnded, _Mapping]] = ..., stopped: _Optional[_Union[LeaseStopped, _Mapping]] = ...) -> None: ...

class StartLease(_message.Message):
    __slots__ = ("lease_id", "token", "device_ids", "user", "memory_bytes", "fraction", "mirror_bytes", "mirror_file_bytes")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    user: str
    memory_bytes: int
    fraction: float
    mirror_bytes: int
    mirror_file_bytes: int
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ..., device_ids: _Optional[_Iterable[str]] = ..., user: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., fraction: _Optional[float] = ..., mirror_bytes: _Optional[int] = ..., mirror_file_bytes: _Optional[int] = ...) -> None: ...

class StopLease(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class BrokerCommand(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: StartLease
    stop: StopLease
    def __init__(self, start: _Optional[_Union[StartLease, _Mapping]] = ..., stop: _Optional[_Union[StopLease, _Mapping]] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("python_version", "torch_version", "cloudpickle_version", "client_host", "cwd", "sys_path", "env", "marker_path", "marker_content", "mirror_bytes", "mirror_file_bytes")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    SYS_PATH_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    MARKER_PATH_FIELD_NUMBER: _ClassVar[int]
    MARKER_CONTENT_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    python_version: str
    torch_version: str
    cloudpickle_version: str
    client_host: str
    cwd: str
    sys_path: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    marker_path: str
    marker_content: str
    mirror_bytes: int
    mirror_file_bytes: int
    def __init__(self, python_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., cloudpickle_version: _Optional[str] = ..., client_host: _Optional[str] = ..., cwd: _Optional[str] = ..., sys_path: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., marker_path: _Optional[str] = ..., marker_content: _Optional[str] = ..., mirror_bytes: _Optional[int] = ..., mirror_file_bytes: _Optional[int] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("python_version", "torch_version", "cloudpickle_version", "host", "pid", "cwd", "cuda_available", "device_summary", "lease_id", "blob_cache", "blob_cache_bytes", "note", "shared_folder", "side_channel_port", "bound_by", "assigned", "side_channel_unix", "boot_id")
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOUDPICKLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    CUDA_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_CACHE_FIELD_NUMBER: _ClassVar[int]
    BLOB_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    SHARED_FOLDER_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_PORT_FIELD_NUMBER: _ClassVar[int]
    BOUND_BY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_UNIX_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    python_version: str
    torch_version: str
    cloudpickle_version: str
    host: str
    pid: int
    cwd: str
    cuda_available: bool
    device_summary: str
    lease_id: str
    blob_cache: str
    blob_cache_bytes: int
    note: str
    shared_folder: bool
    side_channel_port: int
    bound_by: str
    assigned: bool
    side_channel_unix: str
    boot_id: str
    def __init__(self, python_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., cloudpickle_version: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., cwd: _Optional[str] = ..., cuda_available: _Optional[bool] = ..., device_summary: _Optional[str] = ..., lease_id: _Optional[str] = ..., blob_cache: _Optional[str] = ..., blob_cache_bytes: _Optional[int] = ..., note: _Optional[str] = ..., shared_folder: _Optional[bool] = ..., side_channel_port: _Optional[int] = ..., bound_by: _Optional[str] = ..., assigned: _Optional[bool] = ..., side_channel_unix: _Optional[str] = ..., boot_id: _Optional[str] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "digest", "mode", "deleted", "over_limit")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    digest: str
    mode: int
    deleted: bool
    over_limit: bool
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ..., mode: _Optional[int] = ..., deleted: _Optional[bool] = ..., over_limit: _Optional[bool] = ...) -> None: ...

class MirrorRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class MirrorReply(_message.Message):
    __slots__ = ("missing", "folder")
    MISSING_FIELD_NUMBER: _ClassVar[int]
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[str]
    folder: str
    def __init__(self, missing: _Optional[_Iterable[str]] = ..., folder: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: FileEntry
    data: bytes
    def __init__(self, file: _Optional[_Union[FileEntry, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FilesReply(_message.Message):
    __slots__ = ("files", "bytes_received")
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    files: int
    bytes_received: int
    def __init__(self, files: _Optional[int] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class FileChangesRequest(_message.Message):
    __slots__ = ("budget_bytes", "file_limit_bytes")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILE_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    file_limit_bytes: int
    def __init__(self, budget_bytes: _Optional[int] = ..., file_limit_bytes: _Optional[int] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("code", "execution_count", "silent")
    CODE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    code: str
    execution_count: int
    silent: bool
    def __init__(self, code: _Optional[str] = ..., execution_count: _Optional[int] = ..., silent: _Optional[bool] = ...) -> None: ...

class InputReply(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: str
    def __init__(self, value: _Optional[str] = ...) -> None: ...

class ExecuteInput(_message.Message):
    __slots__ = ("request", "input_reply")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    INPUT_REPLY_FIELD_NUMBER: _ClassVar[int]
    request: ExecuteRequest
    input_reply: InputReply
    def __init__(self, request: _Optional[_Union[ExecuteRequest, _Mapping]] = ..., input_reply: _Optional[_Union[InputReply, _Mapping]] = ...) -> None: ...

class StreamText(_message.Message):
    __slots__ = ("name", "text")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    text: str
    def __init__(self, name: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class DisplayData(_message.Message):
    __slots__ = ("data_json", "metadata_json", "display_id", "update")
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    data_json: str
    metadata_json: str
    display_id: str
    update: bool
    def __init__(self, data_json: _Optional[str] = ..., metadata_json: _Optional[str] = ..., display_id: _Optional[str] = ..., update: _Optional[bool] = ...) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("ename", "evalue", "traceback")
    ENAME_FIELD_NUMBER: _ClassVar[int]
    EVALUE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    ename: str
    evalue: str
    traceback: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ename: _Optional[str] = ..., evalue: _Optional[str] = ..., traceback: _Optional[_Iterable[str]] = ...) -> None: ...

class InputRequest(_message.Message):
    __slots__ = ("prompt", "password")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    password: bool
    def __init__(self, prompt: _Optional[str] = ..., password: _Optional[bool] = ...) -> None: ...

class ClearOutput(_message.Message):
    __slots__ = ("wait",)
    WAIT_FIELD_NUMBER: _ClassVar[int]
    wait: bool
    def __init__(self, wait: _Optional[bool] = ...) -> None: ...

class ExecuteDone(_message.Message):
    __slots__ = ("ok", "seconds")
    OK_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    seconds: float
    def __init__(self, ok: _Optional[bool] = ..., seconds: _Optional[float] = ...) -> None: ...

class ExecuteOutput(_message.Message):
    __slots__ = ("stream", "display", "execute_result", "error", "input_request", "clear_output", "done")
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    INPUT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CLEAR_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    stream: StreamText
    display: DisplayData
    execute_result: DisplayData
    error: ErrorInfo
    input_request: InputRequest
    clear_output: ClearOutput
    done: ExecuteDone
    def __init__(self, stream: _Optional[_Union[StreamText, _Mapping]] = ..., display: _Optional[_Union[DisplayData, _Mapping]] = ..., execute_result: _Optional[_Union[DisplayData, _Mapping]] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., input_request: _Optional[_Union[InputRequest, _Mapping]] = ..., clear_output: _Optional[_Union[ClearOutput, _Mapping]] = ..., done: _Optional[_Union[ExecuteDone, _Mapping]] = ...) -> None: ...

class InterruptRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InterruptReply(_message.Message):
    __slots__ = ("interrupted",)
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    interrupted: bool
    def __init__(self, interrupted: _Optional[bool] = ...) -> None: ...

class NamespaceHeader(_message.Message):
    __slots__ = ("part_sizes", "imports", "problems", "names", "side_channel_token")
    class ImportsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PART_SIZES_FIELD_NUMBER: _ClassVar[int]
    IMPORTS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    part_sizes: _containers.RepeatedScalarFieldContainer[int]
    imports: _containers.ScalarMap[str, str]
    problems: _containers.RepeatedCompositeFieldContainer[NameProblem]
    names: _containers.RepeatedScalarFieldContainer[str]
    side_channel_token: str
    def __init__(self, part_sizes: _Optional[_Iterable[int]] = ..., imports: _Optional[_Mapping[str, str]] = ..., problems: _Optional[_Iterable[_Union[NameProblem, _Mapping]]] = ..., names: _Optional[_Iterable[str]] = ..., side_channel_token: _Optional[str] = ...) -> None: ...

class NameProblem(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class NamespaceChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: NamespaceHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[NamespaceHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("names", "problems", "bytes_received", "side_arena_free")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SIDE_ARENA_FREE_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    problems: _containers.RepeatedCompositeFieldContainer[NameProblem]
    bytes_received: int
    side_arena_free: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., problems: _Optional[_Iterable[_Union[NameProblem, _Mapping]]] = ..., bytes_received: _Optional[int] = ..., side_arena_free: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("skip", "force", "have", "via_cache", "side_channel", "side_arena_free")
    SKIP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    VIA_CACHE_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SIDE_ARENA_FREE_FIELD_NUMBER: _ClassVar[int]
    skip: _containers.RepeatedScalarFieldContainer[str]
    force: bool
    have: _containers.RepeatedScalarFieldContainer[str]
    via_cache: bool
    side_channel: bool
    side_arena_free: int
    def __init__(self, skip: _Optional[_Iterable[str]] = ..., force: _Optional[bool] = ..., have: _Optional[_Iterable[str]] = ..., via_cache: _Optional[bool] = ..., side_channel: _Optional[bool] = ..., side_arena_free: _Optional[int] = ...) -> None: ...

class SideChannelRequest(_message.Message):
    __slots__ = ("part_sizes",)
    PART_SIZES_FIELD_NUMBER: _ClassVar[int]
    part_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, part_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class SideChannelTicket(_message.Message):
    __slots__ = ("token", "port")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    token: str
    port: int
    def __init__(self, token: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class BlobList(_message.Message):
    __slots__ = ("digests",)
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, digests: _Optional[_Iterable[str]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("lease_id", "token", "env", "device_summary", "isolate", "uid", "gid", "user_name", "gpu_uuids")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ISOLATE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    USER_NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    token: str
    env: _containers.ScalarMap[str, str]
    device_summary: str
    isolate: bool
    uid: int
    gid: int
    user_name: str
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_id: _Optional[str] = ..., token: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., device_summary: _Optional[str] = ..., isolate: _Optional[bool] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., user_name: _Optional[str] = ..., gpu_uuids: _Optional[_Iterable[str]] = ...) -> None: ...

class AssignReply(_message.Message):
    __slots__ = ("pid",)
    PID_FIELD_NUMBER: _ClassVar[int]
    pid: int
    def __init__(self, pid: _Optional[int] = ...) -> None: ...

class WorkerRevokeRequest(_message.Message):
    __slots__ = ("lease_id", "reason", "wait_seconds")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    wait_seconds: float
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class WorkerRevokeReply(_message.Message):
    __slots__ = ("interrupted", "cell_stopped")
    INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    CELL_STOPPED_FIELD_NUMBER: _ClassVar[int]
    interrupted: bool
    cell_stopped: bool
    def __init__(self, interrupted: _Optional[bool] = ..., cell_stopped: _Optional[bool] = ...) -> None: ...
