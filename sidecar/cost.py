"""What a task cost, in US dollars.

Prices come from the `genai-prices` catalogue bundled with the installed
package (its data is a Python module: nothing is fetched at run time; we never
start its `UpdatePrices` background updater). `config.prices` overrides win
over the catalogue. Local Ollama models cost nothing; for them we also report
what the same tokens would have cost on `config.claude.baseline_model`.

The catalogue matches real model ids (`claude-sonnet-4-5-20250929`,
`claude-3-5-sonnet-20241022`, ...) to its entries, so dated ids price
correctly: the original sidecar keyed its own table by `claude-sonnet-4.5` and
priced every real run at $0.
"""

from __future__ import annotations

from decimal import Decimal

from .config import Config, PriceOverride
from .log import get_logger

log = get_logger(__name__)

# Providers whose models run on the agent's own hardware.
LOCAL_PROVIDERS = frozenset({"ollama"})

_MTOK = Decimal(1_000_000)


def _override_cost(price: PriceOverride, tokens_in: int, tokens_out: int) -> float:
    total = (
        Decimal(tokens_in) * Decimal(repr(price.input_per_mtok))
        + Decimal(tokens_out) * Decimal(repr(price.output_per_mtok))
    ) / _MTOK
    return float(total)


class CostModel:
    """Prices token counts for a model: config overrides, then the catalogue.

    `cost_usd` returns None for a model nobody prices (logged once per model);
    the caller decides what to report then.
    """

    def __init__(self, config: Config) -> None:
        self._overrides: dict[str, PriceOverride] = {}
        for key, price in config.prices.items():
            self._overrides[key] = price
            self._overrides.setdefault(key.lower(), price)
        self.baseline_model = config.claude.baseline_model
        self._unknown_logged: set[tuple[str | None, str]] = set()
        # The catalogue (genai-prices and pydantic) is imported at the first
        # lookup, not here: it costs ~12 MB of RSS that a sidecar running only
        # shell tasks never needs (idle RSS target: 50 MB). The first priced
        # result pays the import and index build once (~130 ms on a 2-core VM).

    def _override_for(self, model: str) -> PriceOverride | None:
        return self._overrides.get(model) or self._overrides.get(model.lower())

    def cost_usd(
        self,
        model: str,
        tokens_in: int,
        tokens_out: int,
        *,
        provider: str | None,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> float | None:
        """Cost of one run in USD, or None when the model has no known price.

        `tokens_in` is all input tokens, cached ones included (the catalogue's
        convention; Anthropic's API reports cache tokens separately, so add
        them before calling). The cache counts are the parts of `tokens_in`
        read from / written to the prompt cache, priced at their own rates.
        An override in `config.prices` (by the exact id, or by the catalogue's
        canonical id, e.g. `claude-sonnet-4-5` for `claude-sonnet-4-5-20250929`)
        wins, and prices all input tokens at its one input rate.
        """
        tokens_in = max(0, int(tokens_in))
        tokens_out = max(0, int(tokens_out))
        override = self._override_for(model)
        if override is not None:
            return _override_cost(override, tokens_in, tokens_out)
        if provider is not None and provider.lower() in LOCAL_PROVIDERS:
            return 0.0
        cache_read = min(max(0, int(cache_read_tokens)), tokens_in)
        cache_write = min(max(0, int(cache_write_tokens)), tokens_in - cache_read)
        from genai_prices import Usage, calc_price

        usage = Usage(
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cache_read_tokens=cache_read or None,
            cache_write_tokens=cache_write or None,
        )
        try:
            calc = calc_price(usage, model_ref=model, provider_id=provider)
        except LookupError as exc:
            # genai-prices raises LookupError for an unknown model or provider.
            key = (provider, model)
            if key not in self._unknown_logged:
                self._unknown_logged.add(key)
                log.warning("price_unknown", model=model, provider=provider, detail=str(exc))
            return None
        canonical = self._override_for(calc.model.id)
        if canonical is not None:
            return _override_cost(canonical, tokens_in, tokens_out)
        return float(calc.total_price)

    def equivalent_claude_cost(self, tokens_in: int, tokens_out: int) -> float | None:
        """What these tokens would have cost on the configured Claude baseline model.

        None only if the baseline model itself has no price (a typo in config;
        logged once), so that the result reports null rather than a false $0.
        """
        return self.cost_usd(self.baseline_model, tokens_in, tokens_out, provider="anthropic")
