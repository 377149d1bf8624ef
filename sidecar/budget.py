"""The hub's rate budget, as we model it: one owner of "the hub said wait".

The hub keeps, per agent, a *normal*-tier token bucket (capacity 60, refilled
at 1 a second, created full) that every `task_accepted`, `task_progress`,
`task_complete`, `task_failed`, `task_recovering` and report frame draws on;
over it, the frame is dropped and answered `rate_limited`. A dropped result
must be resent, and a refusal makes the hub skip the agent for 60 s, so the
sidecar models that bucket and spends it itself:

- lifecycle frames (accepts, results, recovery) may take any whole token;
- progress may only take tokens above a *reserve* kept for lifecycle frames:
  `reserve` plus one per task held (each still owes at least a result), and
  never more than the bucket less two frames, so keep-alives always go; the
  last `flush_headroom` tokens above it are for a finishing task's final
  progress only (`flush=True`), so that it can precede the result even while
  other tasks spend everything the refill brings;
- `rate_limited` empties the model and pauses every normal-tier frame until
  `retry_after`, capped at `max_pause_s` (a hub number is not trusted to stop
  us for longer: the hub reclaims tasks whose accept is 60 s late). The hub
  computes `retry_after` as the time its bucket takes to hold a token again,
  so one lifecycle frame (the dropped one, resent) may go at its end, whatever
  the emptied and penalised model says; the frames after it follow the model;
- `rate_limit_warning` carries the hub's own count: the model takes it when it
  is lower. When the model was wrong (a warning far below it, or a refusal),
  something we do not see spends the bucket too, so the refill we assume is
  halved for `penalty_s` (repeatable, down to 1/8);
- optionally, `progress_per_min` caps progress frames in any 60 s on top.

Pure: no Trio, no channels; every method takes the caller's `now` (Trio
seconds), so it is tested alone and shared by the link, the accept tracker,
the outbox and the batcher.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .config import Config

MIN_FACTOR = 1 / 8  # lowest refill factor after repeated evidence of drift
_DRIFT = 2.0  # a warning this many tokens below the model means it was wrong
_EPS = 1e-9
# The earliest a lifecycle frame goes again after a refusal, however short the
# pause the hub asked for (the real hub asks in whole seconds).
MIN_RESEND_S = 0.5
# What one frame may cost the hub: it counts in thousandths of a token and
# truncates its refill at every check, so a frame can take up to 1.001 tokens.
FRAME_COST = 1.001


@attrs.define
class BudgetStats:
    """Counters over the budget's life (read them, do not write them)."""

    lifecycle_frames: int = 0
    progress_frames: int = 0
    rate_limited: int = 0
    warnings: int = 0
    drift_corrections: int = 0
    capped_pauses: int = 0  # `retry_after` beyond `max_pause_s` (or not a number)


class RateBudget:
    """The modelled normal-tier bucket, the reserve, and the hub's pause."""

    def __init__(
        self,
        capacity: int = 60,
        refill_per_s: float = 1.0,
        reserve: int = 12,
        *,
        max_pause_s: float = 30.0,
        penalty_s: float = 60.0,
        progress_per_min: int | None = None,
        flush_headroom: int = 2,
    ) -> None:
        if capacity < 3 or refill_per_s <= 0 or not 0 <= reserve <= capacity - 2:
            raise ValueError("capacity >= 3, refill_per_s > 0 and 0 <= reserve <= capacity - 2 are required")
        if progress_per_min is not None and progress_per_min < 1:
            raise ValueError("progress_per_min must be at least 1")
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self.reserve = reserve
        self.max_pause_s = max_pause_s
        self.penalty_s = penalty_s
        self.progress_per_min = progress_per_min
        self.flush_headroom = flush_headroom
        self.stats = BudgetStats()
        self.paused_until = -math.inf
        self.limited_at = -math.inf  # when the hub last refused a frame
        self._tokens = float(capacity)
        self._at: float | None = None  # None: created full on first use, like the hub's
        self._factor = 1.0
        self._penalty_until = -math.inf
        # After a refusal with the hub's own `retry_after`: when one lifecycle
        # frame may go, the model notwithstanding (None: no such frame is owed).
        self._resend_at: float | None = None
        # The optional progress cap: a second bucket, `progress_per_min` full.
        self._ptokens = float(progress_per_min or 0)

    @classmethod
    def from_config(cls, config: Config) -> RateBudget:
        """The budget a config describes (the hub's normal bucket and our reserve)."""
        return cls(
            capacity=config.hub_rate_capacity,
            refill_per_s=config.hub_rate_refill_per_s,
            reserve=config.progress_reserve,
            progress_per_min=config.progress_budget_per_min,
        )

    # -- reading ------------------------------------------------------------------

    def tokens(self, now: float) -> float:
        """Tokens the hub's bucket holds at `now`, by the model."""
        self._advance(now)
        return self._tokens

    def factor(self, now: float) -> float:
        """The share of the hub's refill the model currently assumes (1, 1/2, ... 1/8)."""
        self._advance(now)
        return self._factor

    def reserve_for(self, held: int) -> float:
        """Tokens progress must leave for lifecycle frames while `held` tasks are held.

        Never so many that no progress could go at all: a running task's
        keep-alive is what stops the hub reclaiming it.
        """
        return min(self.reserve + max(0, held), self.capacity - 2 * FRAME_COST)

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def lifecycle_at(self, now: float) -> float:
        """The earliest time a lifecycle frame may be sent (`now` if it may go now)."""
        if self._resend_at is not None:
            return max(now, self.paused_until, self._resend_at)
        return max(now, self.paused_until, self._time_for(now, FRAME_COST))

    def progress_level(self, held: int, flush: bool = False) -> float:
        """Tokens the model must hold for a progress frame to go (`flush`: a final one)."""
        base = self.reserve + max(0, held) + (0 if flush else self.flush_headroom)
        return min(base, self.capacity - 2 * FRAME_COST) + FRAME_COST

    def progress_at(self, now: float, held: int, flush: bool = False) -> float:
        """The earliest time a progress frame may be sent with `held` tasks held."""
        at = max(now, self.paused_until, self._time_for(now, self.progress_level(held, flush)))
        if self.progress_per_min is not None and self._ptokens + _EPS < 1.0:
            at = max(at, now + (1.0 - self._ptokens) * 60.0 / self.progress_per_min)
        return at

    def progress_ready(self, now: float, held: int, flush: bool = False) -> bool:
        return self.progress_at(now, held, flush) <= now

    # -- spending -----------------------------------------------------------------

    def spend_lifecycle(self, now: float) -> None:
        """A normal-tier frame other than progress was written to the socket."""
        self._advance(now)
        self.stats.lifecycle_frames += 1
        self._tokens = max(0.0, self._tokens - FRAME_COST)
        self._resend_at = None

    def spend_progress(self, now: float) -> None:
        """A `task_progress` frame was written to the socket."""
        self._advance(now)
        self.stats.progress_frames += 1
        self._tokens = max(0.0, self._tokens - FRAME_COST)
        if self.progress_per_min is not None:
            self._ptokens = max(0.0, self._ptokens - 1.0)

    def refund_progress(self, now: float) -> None:
        """A progress frame taken with `spend_progress` could not be sent."""
        self._advance(now)
        self.stats.progress_frames -= 1
        self._tokens = min(float(self.capacity), self._tokens + FRAME_COST)
        if self.progress_per_min is not None:
            self._ptokens = min(float(self.progress_per_min), self._ptokens + 1.0)

    # -- what the hub said --------------------------------------------------------

    def on_rate_limited(self, now: float, retry_after_s: float | None) -> float:
        """The hub dropped a frame: empty the model, pause; returns the pause applied (s)."""
        self._advance(now)
        self.stats.rate_limited += 1
        self._resend_at = None
        if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s < 0:
            self.stats.capped_pauses += 1
            pause = 1.0
        elif retry_after_s > self.max_pause_s:
            self.stats.capped_pauses += 1
            pause = self.max_pause_s
        else:
            pause = retry_after_s
            self._resend_at = now + max(pause, MIN_RESEND_S)
        self._tokens = 0.0
        self.limited_at = now
        self.paused_until = max(self.paused_until, now + pause)
        self._penalize(now)
        return pause

    def on_warning(self, now: float, remaining: int | None) -> bool:
        """The hub warned it is low; True if its count showed the model was wrong."""
        self._advance(now)
        self.stats.warnings += 1
        if remaining is None or remaining < 0:
            return False
        drift = self._tokens - remaining > _DRIFT
        if drift:
            self.stats.drift_corrections += 1
            self._penalize(now)
        self._tokens = min(self._tokens, float(remaining))
        return drift

    # -- model --------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._at is None:
            self._at = now
            return
        while self._factor < 1.0 and now >= self._penalty_until:
            # Refill at the lower rate up to the end of the penalty, then recover.
            self._refill(self._penalty_until)
            self._factor = min(1.0, self._factor * 2)
            self._penalty_until += self.penalty_s
        self._refill(now)

    def _refill(self, until: float) -> None:
        assert self._at is not None
        dt = until - self._at
        if dt <= 0:
            return
        self._tokens = min(float(self.capacity), self._tokens + dt * self.refill_per_s * self._factor)
        if self.progress_per_min is not None:
            per_min = self.progress_per_min
            self._ptokens = min(float(per_min), self._ptokens + dt * per_min / 60.0)
        self._at = until

    def _time_for(self, now: float, level: float) -> float:
        """When the model holds at least `level` tokens (assuming the current factor)."""
        self._advance(now)
        if self._tokens + _EPS >= level:
            return now
        return now + (level - self._tokens) / (self.refill_per_s * self._factor)

    def _penalize(self, now: float) -> None:
        self._factor = max(MIN_FACTOR, self._factor / 2)
        self._penalty_until = now + self.penalty_s
