"""The lease's one field list and state list, and what follows from them."""

from __future__ import annotations

from gpuattach_broker.broker import schema
from gpuattach_broker.broker.lease_schema import (
    ACTIVE_STATES,
    ENDED_STATES,
    LEASE_FIELDS,
    LeaseRecord,
    LeaseState,
    hash_token,
    lease_to_pb,
)
from gpuattach_broker.protos import gpuattach_pb2 as pb


def test_python_states_mirror_the_proto_enum() -> None:
    proto = {
        name.removeprefix("LEASE_STATE_").lower(): number
        for name, number in pb.LeaseState.items()
        if name != "LEASE_STATE_UNSPECIFIED"
    }
    assert {s.value: s.pb_value for s in LeaseState} == proto
    assert set(ACTIVE_STATES) | set(ENDED_STATES) == set(LeaseState)
    assert not set(ACTIVE_STATES) & set(ENDED_STATES)
    assert LeaseState.PREEMPTING.running
    assert not LeaseState.PREEMPTED.running


def test_every_field_has_a_column_and_a_wire_place_that_exists() -> None:
    names = [f.name for f in LEASE_FIELDS]
    assert names == list(LeaseRecord.__dataclass_fields__)
    assert [c.key for c in schema.leases.columns] == names
    assert "user" not in [c.name for c in schema.leases.columns]  # an SQL keyword
    lease_fields = pb.Lease.DESCRIPTOR.fields_by_name
    for spec in LEASE_FIELDS:
        if spec.pb_path is None:
            continue
        head, _, tail = spec.pb_path.partition(".")
        assert head in lease_fields, spec
        if tail:
            message = lease_fields[head].message_type
            assert message is not None, spec
            assert tail in message.fields_by_name, spec


def test_lease_to_pb_carries_every_sent_field_and_no_secret() -> None:
    record = LeaseRecord(
        lease_id="L1",
        user="alice",
        token_hash=hash_token("secret"),
        requested_at=1.5,
        state=LeaseState.PREEMPTING,
        device_ids=["a", "b"],
        memory_bytes=80 * 1024**3,
        req_memory_bytes=4 * 1024**3,
        req_fraction=0.25,
        req_gpus=2,
        exclusive=True,
        granted_at=2.5,
        priority=3,
        preempt_deadline=9.0,
        groups=["g"],
    )
    message = lease_to_pb(record, token="tok")
    assert (message.lease_id, message.user, message.state) == ("L1", "alice", "preempting")
    assert list(message.device_ids) == ["a", "b"]
    assert message.memory_bytes == 80 * 1024**3
    assert (message.slice.memory_bytes, message.slice.fraction, message.slice.gpus) == (
        4 * 1024**3,
        0.25,
        2,
    )
    assert (message.granted_at, message.priority, message.preempt_deadline) == (2.5, 3, 9.0)
    assert message.token == "tok"
    assert hash_token("secret") not in message.SerializeToString().decode("latin-1")
