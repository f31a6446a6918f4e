"""A comma-separated list of broker addresses becomes one failover channel."""

from __future__ import annotations

import pytest

from gpuattach_broker.tls import broker_target


def test_one_address_is_used_as_it_is() -> None:
    assert broker_target("broker.example:50051") == ("broker.example:50051", [])


def test_a_list_becomes_one_pick_first_channel_over_all_addresses() -> None:
    target, options = broker_target("localhost:5001, localhost:5002")
    assert target in ("ipv4:127.0.0.1:5001,127.0.0.1:5002", "ipv6:[::1]:5001,[::1]:5002")
    settings = dict(options)
    assert settings["grpc.lb_policy_name"] == "pick_first"
    assert settings["grpc.max_reconnect_backoff_ms"] <= 1000  # a standby takes over soon
    assert settings["grpc.keepalive_time_ms"] <= 5000  # a paused broker is noticed
    assert settings["grpc.ssl_target_name_override"] == "localhost"  # TLS checks this name


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:5001,127.0.0.1", "use host:port"),
        ("127.0.0.1:5001,no-such-host.invalid:5002", "cannot resolve"),
    ],
)
def test_a_bad_list_says_which_address_is_wrong(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        broker_target(address)
