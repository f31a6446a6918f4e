"""Policy keys for a notebook's files on another host: mirror budgets and forwarded credentials."""

from __future__ import annotations

import pytest

from gpuattach_broker.broker.policy import PolicyErrors, parse_policy


def test_mirror_budgets_and_forward_list_default_and_parse() -> None:
    empty = parse_policy("").effective("alice").limits
    assert (empty.mirror_bytes, empty.mirror_file_bytes) == (2 << 30, 1 << 30)
    assert empty.forward_env is None  # no list: the kernel's own GPUATTACH_FORWARD_ENV

    policy = parse_policy(
        """
[defaults]
mirror_bytes = "500MiB"
mirror_file_bytes = "100MiB"
forward_env = []

[groups.ml]
members = ["alice"]
mirror_bytes = "8GiB"
forward_env = ["WANDB_API_KEY"]

[groups.hf]
members = ["alice"]
forward_env = ["HF_TOKEN", "WANDB_API_KEY"]
"""
    )
    alice = policy.effective("alice").limits
    assert alice.mirror_bytes == 8 << 30
    assert alice.mirror_file_bytes == 100 << 20
    assert alice.forward_env == ("WANDB_API_KEY", "HF_TOKEN")  # every group's names
    bob = policy.effective("bob").limits
    assert (bob.mirror_bytes, bob.forward_env) == (500 << 20, ())


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('mirror_bytes = "lots"', "cannot read size"),
        ("mirror_bytes = 0", "above zero"),
        ('mirror_file_bytes = "-1GiB"', "mirror_file_bytes"),
        ('forward_env = "HF_TOKEN"', "list of variable names"),
        ('forward_env = ["HF TOKEN"]', "not a variable name: 'HF TOKEN'"),
        ("forward_env = [1]", "list of variable names"),
    ],
)
def test_bad_values_are_named_with_their_line_and_a_hint(line: str, words: str) -> None:
    with pytest.raises(PolicyErrors) as info:
        parse_policy(f"[defaults]\n{line}\n")
    message = str(info.value)
    assert "line 2" in message
    assert words in message
    assert "hint" in message
