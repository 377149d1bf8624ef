"""Per-agent token buckets and identify cooldowns, as the real hub keeps them.

Rate limits (`AgentCom.RateLimiter`): one bucket per agent and tier, lazily
refilled on each check, created full on first use. Each frame costs one token.
A check returns `Allow`, `Warn` (allowed, but fewer than 20 % of the tokens
remain: the hub then sends `rate_limit_warning` before its reply) or `Deny`
(the frame is dropped and answered `rate_limited`, `retry_after_ms` rounded up
to whole seconds). A denied agent is skipped by the scheduler for 60 s from
the first denial of its window.

Cooldowns (`AgentCom.Validation.ViolationTracker`): each validation disconnect
of an identified agent raises its count; `identify` is refused for 30 s, 60 s,
then 300 s after the latest one. Counts are never reset while the hub runs.

All times are Trio times in seconds (`trio.current_time()`), so a `MockClock`
drives them.
"""

from __future__ import annotations

import math

import attrs

TIERS = ("light", "normal", "heavy")

# Message type → tier (`AgentCom.RateLimiter.Config.ws_tier/1`); others are "normal".
_LIGHT = frozenset({"ping", "list_agents", "list_channels", "status", "channel_history"})
_HEAVY = frozenset({"identify"})

_WARN_FRACTION = 0.2
_TOKEN = 1000  # the hub counts in thousandths of a token


def tier_of(message_type: str) -> str:
    """The rate-limit tier the real hub files a message type under."""
    if message_type in _LIGHT:
        return "light"
    if message_type in _HEAVY:
        return "heavy"
    return "normal"


@attrs.frozen
class TierLimit:
    """A bucket of `capacity` tokens refilled at `per_minute` tokens a minute."""

    capacity: int
    per_minute: float


@attrs.frozen
class RateLimits:
    """The three tiers; defaults are the real hub's."""

    light: TierLimit = TierLimit(120, 120)
    normal: TierLimit = TierLimit(60, 60)
    heavy: TierLimit = TierLimit(10, 10)
    skip_scheduling_s: float = 60.0

    def tier(self, name: str) -> TierLimit:
        limit: TierLimit = getattr(self, name)
        return limit


@attrs.frozen
class Allow:
    remaining: int


@attrs.frozen
class Warn:
    remaining: int
    capacity: int


@attrs.frozen
class Deny:
    retry_after_ms: int


Verdict = Allow | Warn | Deny


@attrs.define
class _Bucket:
    tokens: int  # thousandths
    last: float  # trio seconds


@attrs.define
class _Denials:
    window_start: float
    count: int


@attrs.define
class RateLimiter:
    """Buckets per (agent, tier) and the scheduler's skip list."""

    limits: RateLimits
    _buckets: dict[tuple[str, str], _Bucket] = attrs.field(factory=dict)
    _denials: dict[str, _Denials] = attrs.field(factory=dict)

    def check(self, agent_id: str, tier: str, now: float) -> Verdict:
        """Take one token from the agent's bucket for `tier`."""
        limit = self.limits.tier(tier)
        capacity = limit.capacity * _TOKEN
        rate_per_ms = limit.per_minute * _TOKEN / 60_000.0
        bucket = self._buckets.get((agent_id, tier))
        if bucket is None:
            tokens = capacity
        else:
            elapsed_ms = max(0.0, (now - bucket.last) * 1000.0)
            tokens = min(bucket.tokens + math.trunc(elapsed_ms * rate_per_ms), capacity)
        if tokens >= _TOKEN:
            remaining = tokens - _TOKEN
            self._buckets[(agent_id, tier)] = _Bucket(remaining, now)
            if remaining < math.trunc(capacity * _WARN_FRACTION):
                return Warn(remaining // _TOKEN, limit.capacity)
            return Allow(remaining // _TOKEN)
        needed = _TOKEN - tokens
        retry_ms = math.ceil(needed / rate_per_ms) if rate_per_ms > 0 else 60_000
        retry_ms = (retry_ms + 999) // 1000 * 1000
        self._buckets[(agent_id, tier)] = _Bucket(tokens, now)
        self._record_denial(agent_id, now)
        return Deny(retry_ms)

    def _record_denial(self, agent_id: str, now: float) -> None:
        d = self._denials.get(agent_id)
        if d is None or now - d.window_start > self.limits.skip_scheduling_s:
            self._denials[agent_id] = _Denials(now, 1)
        else:
            d.count += 1

    def skip_until(self, agent_id: str) -> float | None:
        """When the scheduler stops skipping this agent, or None if it does not skip it."""
        d = self._denials.get(agent_id)
        if d is None:
            return None
        return d.window_start + self.limits.skip_scheduling_s

    def reset(self) -> None:
        self._buckets.clear()
        self._denials.clear()


@attrs.define
class Cooldowns:
    """Identify cooldowns after validation disconnects (30 s, 60 s, then 300 s)."""

    durations: tuple[float, ...] = (30.0, 60.0, 300.0)
    _entries: dict[str, tuple[int, float]] = attrs.field(factory=dict)

    def record_disconnect(self, agent_id: str, now: float) -> None:
        count, _ = self._entries.get(agent_id, (0, now))
        self._entries[agent_id] = (count + 1, now)

    def count(self, agent_id: str) -> int:
        return self._entries.get(agent_id, (0, 0.0))[0]

    def remaining_s(self, agent_id: str, now: float) -> int | None:
        """Whole seconds left of the agent's cooldown as the hub words it, or None."""
        entry = self._entries.get(agent_id)
        if entry is None:
            return None
        count, at = entry
        cooldown_ms = int(self.durations[min(count, len(self.durations)) - 1] * 1000)
        elapsed_ms = int((now - at) * 1000)
        if elapsed_ms >= cooldown_ms:
            return None
        return (cooldown_ms - elapsed_ms) // 1000 + 1

    def clear(self, agent_id: str | None = None) -> None:
        if agent_id is None:
            self._entries.clear()
        else:
            self._entries.pop(agent_id, None)
