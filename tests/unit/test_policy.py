"""The policy file: parsing, every mistake with its line, effective settings."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuattach_broker.broker.policy import PolicyErrors, load_policy, parse_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"
TUESDAY_1030_BERLIN = dt.datetime(2026, 11, 24, 9, 30, tzinfo=dt.UTC)  # 10:30 CET
TUESDAY_1300_BERLIN = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def test_the_example_policy_is_valid_and_means_what_it_says() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.preemption
    assert policy.preemption_grace == 30
    assert policy.admins() == {"carol"}
    student = policy.effective("alice", now=TUESDAY_1300_BERLIN)
    assert student.groups == ("course-ml101",)
    assert student.limits.gpu_hours_per_day == 4  # the group raises the default of 2
    assert student.limits.max_slice_fraction == 0.5
    assert student.priority_class == "normal"
    in_lab = policy.effective("alice", now=TUESDAY_1030_BERLIN)
    assert in_lab.priority_class == "high"
    assert in_lab.priority == 20
    stranger = policy.effective("zed", now=TUESDAY_1030_BERLIN)
    assert stranger.groups == ()
    assert stranger.limits.max_slices == 1
    assert stranger.priority_class == "normal"
    researcher = policy.effective("carol")
    assert researcher.limits.max_slices == 4
    assert researcher.limits.max_slice_fraction is None


def test_identity_groups_join_policy_groups() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.effective("dave", ["research", "not-in-policy"]).groups == ("research",)


def test_every_mistake_is_reported_with_its_line() -> None:
    text = "\n".join(
        [
            "[defaults]",
            "max_slices = -1",
            "gpu_hours_per_day = 'many'",
            "[groups.x]",
            'priority = "urgent"',
            "colour = 'blue'",
            "[[groups.x.windows]]",
            'days = ["Funday"]',
            'start = "12:00"',
            'end = "10:00"',
            "[users.u]",
            'groups = ["nope"]',
        ]
    )
    with pytest.raises(PolicyErrors) as caught:
        parse_policy(text, "p.toml")
    lines = {(e.line, e.message.split(":")[0]) for e in caught.value.errors}
    assert {line for line, _ in lines} >= {2, 3, 5, 6, 7, 12}
    messages = str(caught.value)
    assert "p.toml:line 2" in messages
    assert "hint:" in messages
    assert "unknown priority class 'urgent'" in messages
    assert "unknown day 'Funday'" in messages
    assert "start before it ends" in messages
    assert "unknown group 'nope'" in messages


def test_syntax_errors_carry_their_line() -> None:
    with pytest.raises(PolicyErrors) as caught:
        parse_policy("[defaults]\nmax_slices = 1\n[groups.x\n")
    assert caught.value.errors[0].line == 3


VALID = EXAMPLE.read_text()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=200),
        st.builds(
            lambda cut, junk, pos: VALID[:pos] + junk + VALID[pos + cut :],
            st.integers(0, 20),
            st.text(alphabet="[]=\"'#.,\n abc0123{}-:", max_size=20),
            st.integers(0, len(VALID)),
        ),
    )
)
def test_malformed_policies_give_line_numbers_never_tracebacks(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyErrors as exc:  # either outcome is fine; an error must name its lines
        assert exc.errors  # noqa: PT017
        for error in exc.errors:
            assert 1 <= error.line <= text.count("\n") + 1
            assert error.message
