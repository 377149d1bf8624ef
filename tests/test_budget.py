"""The rate budget alone: a pure model of the hub's normal bucket, explicit times."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.budget import FRAME_COST, MIN_FACTOR, RateBudget
from sidecar.devhub.ratelimit import Allow, Deny, RateLimiter, RateLimits, TierLimit, Warn


def test_starts_full_and_refills_at_the_hubs_rate() -> None:
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    assert b.tokens(100.0) == 60  # full on first use, whatever the clock says
    for _ in range(10):
        b.spend_lifecycle(100.0)
    assert b.tokens(100.0) == pytest.approx(60 - 10 * FRAME_COST)
    assert b.tokens(105.0) == pytest.approx(60 - 10 * FRAME_COST + 5)
    assert b.tokens(1000.0) == 60  # never above capacity


def test_progress_leaves_the_reserve_plus_one_per_held_task() -> None:
    b = RateBudget(capacity=20, refill_per_s=1.0, reserve=10)
    sent = 0
    while b.progress_ready(0.0, held=3):
        b.spend_progress(0.0)
        sent += 1
    assert sent == 4  # 20 - (10 + 3) - 2 kept for final flushes, less the hub's rounding
    # A finishing task's last progress may use those two.
    while b.progress_ready(0.0, held=3, flush=True):
        b.spend_progress(0.0)
        sent += 1
    assert sent == 6
    assert b.tokens(0.0) >= 13
    # Lifecycle frames may still spend the reserve, down to the last whole token.
    life = 0
    while b.lifecycle_at(0.0) == 0.0:
        b.spend_lifecycle(0.0)
        life += 1
    assert life == 13
    # The next progress frame is due once the bucket is back above the reserve.
    assert b.progress_at(0.0, held=3) == pytest.approx(15 + FRAME_COST - b.tokens(0.0), abs=1e-6)
    assert b.progress_at(0.0, held=3, flush=True) == pytest.approx(13 + FRAME_COST - b.tokens(0.0), abs=1e-6)


def test_absurd_rate_limited_pause_is_capped() -> None:
    b = RateBudget(max_pause_s=30.0)
    for asked in (math.inf, 1e9, math.nan, -5.0, None):
        b2 = RateBudget(max_pause_s=30.0)
        pause = b2.on_rate_limited(10.0, asked)
        assert pause <= 30.0
        assert b2.paused(10.0 + pause - 0.01) and not b2.paused(10.0 + pause)
        assert b2.stats.capped_pauses == 1
    assert b.on_rate_limited(0.0, 2.0) == 2.0
    assert b.stats.capped_pauses == 0
    # The pause holds back lifecycle frames and progress alike.
    assert b.lifecycle_at(0.5) >= 2.0 and b.progress_at(0.5, 0) >= 2.0


def test_rate_limited_empties_the_model_and_halves_the_refill_for_a_while() -> None:
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12, penalty_s=60.0)
    b.on_rate_limited(0.0, 1.0)
    assert b.tokens(0.0) == 0
    assert b.factor(0.0) == 0.5
    assert b.lifecycle_at(0.0) == 1.0  # the dropped frame again, when the hub said
    b.spend_lifecycle(1.0)
    assert b.lifecycle_at(1.0) == pytest.approx(1.0 + FRAME_COST / 0.5)  # the next by the model
    assert b.tokens(60.0) == pytest.approx(29.5)  # half the refill during the penalty
    assert b.factor(60.0) == 1.0
    assert b.tokens(70.0) == pytest.approx(39.5)


@pytest.mark.parametrize("refusals", [1, 3])
def test_the_dropped_frame_goes_again_when_the_hub_said_and_the_hub_takes_it(refusals: int) -> None:
    """Something we do not see drained the hub's bucket: each frame we send is
    refused with the hub's `retry_after`. The resend goes at that time, not at
    the emptied and penalised model's (8 s after a third 1 s refusal), and the
    hub takes it; the next frame waits for the model again."""
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    hub = RateLimiter(RateLimits(normal=TierLimit(60, 60)))
    t = 0.0
    for _ in range(60):
        assert not isinstance(hub.check("a", "normal", t), Deny)  # the unseen spender
    for i in range(refusals):
        if i:  # and it takes the token the hub refilled, just before our resend
            assert not isinstance(hub.check("a", "normal", t), Deny)
        verdict = hub.check("a", "normal", t)
        assert isinstance(verdict, Deny)
        b.on_rate_limited(t, verdict.retry_after_ms / 1000)
        t = b.lifecycle_at(t)
    assert t == pytest.approx(refusals * 1.0)
    assert isinstance(hub.check("a", "normal", t), (Allow, Warn))
    b.spend_lifecycle(t)
    assert b.lifecycle_at(t) == pytest.approx(t + FRAME_COST / b.factor(t))
    assert not b.progress_ready(t, 0)


def test_repeated_refusals_lower_the_factor_to_a_floor() -> None:
    b = RateBudget()
    for i in range(10):
        b.on_rate_limited(float(i), 0.0)
    assert b.factor(10.0) == MIN_FACTOR


def test_warning_with_the_hubs_count_corrects_the_model() -> None:
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    for _ in range(49):
        b.spend_lifecycle(0.0)
    # The hub agrees with the model (about 11 left): no penalty.
    assert b.on_warning(0.0, 10) is False
    assert b.factor(0.0) == 1.0 and b.tokens(0.0) <= 11
    # Something we do not see spent the bucket: the hub has far fewer.
    b2 = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    assert b2.on_warning(0.0, 5) is True
    assert b2.tokens(0.0) == 5 and b2.factor(0.0) == 0.5
    assert b2.stats.drift_corrections == 1


def test_optional_progress_cap_per_minute() -> None:
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12, progress_per_min=6)
    times = []
    t = 0.0
    while t < 120.0:
        at = b.progress_at(t, 0)
        t = at
        if t >= 120.0:
            break
        b.spend_progress(t)
        times.append(t)
    assert len([x for x in times if x < 60.0]) <= 12  # 6 at once, then 6 more over the minute
    assert all(y - x >= 10.0 - 1e-6 for x, y in itertools.pairwise(times[6:]))


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.1, 0.5, 3.0]),  # time since the previous step
            st.sampled_from(["life", "life", "progress", "progress", "progress"]),
            st.integers(0, 4),  # tasks held
        ),
        min_size=50,
        max_size=400,
    )
)
def test_property_frames_sent_when_the_model_allows_are_never_refused(
    steps: list[tuple[float, str, int]],
) -> None:
    """Replayed through the dev hub's copy of the real hub's limiter: a frame sent
    when the budget said it may go is never denied, and progress never takes the
    hub's bucket below the reserve."""
    b = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    hub = RateLimiter(RateLimits(normal=TierLimit(60, 60)))
    t = 0.0
    for dt, kind, held in steps:
        t += dt
        at = b.lifecycle_at(t) if kind == "life" else b.progress_at(t, held)
        t = at
        verdict = hub.check("a", "normal", t)
        assert not isinstance(verdict, Deny), (kind, t)
        assert isinstance(verdict, (Allow, Warn))
        if kind == "life":
            b.spend_lifecycle(t)
        else:
            b.spend_progress(t)
            assert verdict.remaining >= 12 + held
            assert isinstance(verdict, Allow)  # a reserve of 12 keeps progress from warnings
