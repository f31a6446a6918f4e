"""Backfill with reservations: small requests pass a waiting large one, and
the large one still starts within its bound."""

from __future__ import annotations

import pytest

from gpuattach_broker.broker.scheduler import Backfill, DeviceState, Scheduler, SliceRequest

GIB = 1024**3


def pool(backfill: Backfill | None) -> Scheduler:
    scheduler = Scheduler(fair_share=True, backfill=backfill)
    for i in range(2):
        scheduler.add_device(DeviceState(f"h1-{i}", "h1", "GPU", "gpu", 16 * GIB))
    return scheduler


def test_small_requests_pass_a_large_one_that_does_not_fit() -> None:
    for backfill, passes in ((None, False), (Backfill(reserve_after=600), True)):
        scheduler = pool(backfill)
        assert scheduler.submit(SliceRequest("held", "a", fraction=0.5)) is not None
        assert scheduler.submit(SliceRequest("big", "b", gpus=2, submitted_at=1)) is None
        small = scheduler.submit(SliceRequest("small", "c", fraction=0.25, submitted_at=2))
        assert (small is not None) is passes
        if not passes:  # without backfill nobody overtakes the head, even when it fits
            assert scheduler.grant_waiting(now=3) == []


def _replay(backfill: Backfill, until: float = 2000.0) -> tuple[float | None, int]:
    """Half-GPU requests arrive every 10 s and hold 25 s each; a 2-GPU request
    arrives at 5 s. Returns when the 2-GPU request started (None: never by
    `until`) and how many small requests started."""
    scheduler = pool(backfill)
    ends: dict[str, float] = {}
    big_started: float | None = None
    small_started = 0
    now, n = 0.0, 0
    while now <= until:
        for lease, end in sorted(ends.items()):
            if end <= now:
                scheduler.free(lease)
                del ends[lease]
        for placement in scheduler.grant_waiting(now=now):
            if placement.request_id == "big":
                big_started = now
                ends["big"] = now + 25
            else:
                small_started += 1
                ends[placement.request_id] = now + 25
        if now == 5.0:
            assert scheduler.submit(SliceRequest("big", "big", gpus=2, submitted_at=now)) is None
        if now % 10 == 0:
            request = SliceRequest(f"s{n}", f"u{n % 7}", fraction=0.5, submitted_at=now)
            n += 1
            if scheduler.submit(request) is not None:
                small_started += 1
                ends[request.request_id] = now + 25
        now += 5.0
    return big_started, small_started


def test_without_a_reservation_the_large_request_starves() -> None:
    # The small requests always keep one device or the other busy.
    started, smalls = _replay(Backfill(reserve_after=float("inf")))
    assert started is None
    assert smalls > 150


def test_the_large_request_starts_within_its_bound() -> None:
    bound, longest_hold, step = 60.0, 25.0, 5.0
    started, smalls = _replay(Backfill(reserve_after=bound))
    assert started is not None
    # reserved at the first decision after the bound, then the leases on the
    # reserved devices end within one hold
    assert started - 5.0 <= bound + longest_hold + step
    # and small requests kept flowing before and after it
    assert smalls > 150


def test_a_reservation_keeps_others_off_its_devices() -> None:
    scheduler = pool(Backfill(reserve_after=30))
    scheduler.submit(SliceRequest("held", "a", fraction=0.5))
    assert scheduler.submit(SliceRequest("big", "b", gpus=2, submitted_at=0)) is None
    assert scheduler.submit(SliceRequest("early", "c", fraction=0.25, submitted_at=10))
    # past the bound: the big request reserves both devices of h1
    assert scheduler.grant_waiting(now=31) == []
    assert scheduler.reservations() == {"big": ("h1-0", "h1-1")}
    late = SliceRequest("late", "c", fraction=0.25, submitted_at=32)
    assert scheduler.submit(late) is None  # would fit, but the room is reserved
    scheduler.free("held")
    scheduler.free("early")
    granted = scheduler.grant_waiting(now=40)
    assert [p.request_id for p in granted] == ["big"]
    assert scheduler.reservations() == {}
    # the big request holds the whole host now; 'late' waits for it
    assert [r.request_id for r in scheduler.queue] == ["late"]


def test_withdrawing_a_reserved_request_releases_its_devices() -> None:
    scheduler = pool(Backfill(reserve_after=0, max_reservations=1))
    scheduler.submit(SliceRequest("held", "a", fraction=0.5))
    scheduler.submit(SliceRequest("big", "b", gpus=2, submitted_at=0))
    scheduler.grant_waiting(now=1)
    assert "big" in scheduler.reservations()
    assert scheduler.withdraw("big")
    assert scheduler.reservations() == {}
    assert scheduler.submit(SliceRequest("s", "c", fraction=0.5, submitted_at=2)) is not None


def test_backfill_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="reserve_after"):
        Backfill(reserve_after=-1)
    with pytest.raises(ValueError, match="max_reservations"):
        Backfill(max_reservations=0)
