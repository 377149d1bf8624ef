"""The one table of executor kinds.

Each kind is one `ExecutorSpec`: its name, its label for humans, the factory
that builds it, its retry policy, the price catalogue's provider for its
tokens, the hub `target_type` values and tiers routed to it, and an optional
`discard` hook that removes what a run of a task may have left on disk when
the task ends without reaching the executor here. A new kind is one entry
here plus one module. Ollama's module loads httpx: its factory defers the
import and the build to the kind's first task (`deferred.Deferred`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs

from ..config import Config
from . import ExecContext, Executor
from .claude import ClaudeExecutor
from .deferred import Deferred
from .shell import ShellExecutor
from .wake import WakeExecutor, discard_result_files


@attrs.frozen
class RetryPolicy:
    """`backoffs_s[i]` is the wait before retry i+1; its length is the retry count."""

    backoffs_s: tuple[float, ...] = ()

    @property
    def max_retries(self) -> int:
        return len(self.backoffs_s)


def _build_ollama(ctx: ExecContext) -> Executor:
    from .ollama import OllamaExecutor

    return OllamaExecutor(ctx)


def _ollama(ctx: ExecContext) -> Executor:
    """The Ollama executor, imported and built on its first task (see `deferred`)."""
    return Deferred(ctx, _build_ollama)


@attrs.frozen
class ExecutorSpec:
    name: str
    label: str
    factory: Callable[[ExecContext], Executor]
    retry: RetryPolicy
    # genai-prices provider of the tokens this kind spends; None: it spends none.
    price_provider: str | None
    # routing_decision.target_type values (lower case) that mean this kind.
    targets: tuple[str, ...] = ()
    # Effective tiers routed here when the routing decision names no target_type.
    tiers: tuple[str, ...] = ()
    discard: Callable[[Config, str], None] | None = None
    # A local model: its results also say what the same tokens would cost on Claude.
    local_model: bool = False


SPECS: tuple[ExecutorSpec, ...] = (
    ExecutorSpec(
        name="shell",
        label="Shell",
        factory=ShellExecutor,
        retry=RetryPolicy((1.0,)),
        price_provider=None,
        targets=("sidecar",),
        tiers=("trivial",),
    ),
    # A transient Ollama failure is mostly a server restarting or a model
    # (re)loading: a short fixed pause is enough, and a long one only delays.
    ExecutorSpec(
        name="ollama",
        label="Ollama",
        factory=_ollama,
        retry=RetryPolicy((1.0, 1.0)),
        price_provider="ollama",
        targets=("ollama",),
        tiers=("standard",),
        local_model=True,
    ),
    # The CLI already retries API errors itself; ours cover a crashed CLI or an
    # overloaded API after its own retries, so back off exponentially.
    ExecutorSpec(
        name="claude",
        label="Claude",
        factory=ClaudeExecutor,
        retry=RetryPolicy((2.0, 4.0, 8.0)),
        price_provider="anthropic",
        targets=("claude",),
        tiers=("complex",),
    ),
    # The wake executor retries its own command (5 s, 15 s, 30 s).
    ExecutorSpec(
        name="wake",
        label="Wake",
        factory=WakeExecutor,
        retry=RetryPolicy(()),
        price_provider=None,
        targets=("wake",),
        discard=discard_result_files,
    ),
)

REGISTRY: Mapping[str, ExecutorSpec] = {spec.name: spec for spec in SPECS}
# A task without any routing decision is the legacy path.
LEGACY_KIND = "wake"
# A routing decision with neither target_type nor a known tier.
DEFAULT_KIND = "ollama"
TARGET_KINDS: Mapping[str, str] = {t: spec.name for spec in SPECS for t in spec.targets}
TIER_KINDS: Mapping[str, str] = {t: spec.name for spec in SPECS for t in spec.tiers}


def build_executors(ctx: ExecContext) -> dict[str, Executor]:
    """One executor of every registered kind."""
    return {spec.name: spec.factory(ctx) for spec in SPECS}


def discard_task_files(config: Config, task_id: str) -> None:
    """Run every kind's `discard` hook for a task that never reached an executor here."""
    for spec in SPECS:
        if spec.discard is not None:
            spec.discard(config, task_id)
