"""CostModel: catalogue prices for real model ids, overrides, local models, unknowns."""

from __future__ import annotations

import socket
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from genai_prices.types import TieredPrices

from sidecar.config import Config
from sidecar.cost import CostModel
from tests.conftest import Logs

# Published Anthropic list prices, USD per million tokens (input, output).
# Each row is also checked against the catalogue's own data below, so a wrong
# number here fails `test_published_prices_match_catalogue`.
PUBLISHED = {
    "claude-sonnet-4-5-20250929": (3, 15),
    "claude-opus-4-1-20250805": (15, 75),
    "claude-haiku-4-5-20251001": (1, 5),
    "claude-3-5-sonnet-20241022": (3, 15),
}


def _base(price: Any) -> Decimal:
    return price.base if isinstance(price, TieredPrices) else price


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_published_prices_match_catalogue(model: str) -> None:
    calc = calc_price(Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id="anthropic")
    price_in, price_out = PUBLISHED[model]
    assert _base(calc.model_price.input_mtok) == Decimal(price_in)
    assert _base(calc.model_price.output_mtok) == Decimal(price_out)


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_real_model_ids_price_correctly(make_config: Any, model: str) -> None:
    cost = CostModel(make_config())
    price_in, price_out = PUBLISHED[model]
    got = cost.cost_usd(model, 10_000, 2_000, provider="anthropic")
    assert got == pytest.approx((10_000 * price_in + 2_000 * price_out) / 1e6, rel=1e-12)
    assert got is not None and got > 0  # the original priced every real run at $0


def test_provider_inferred_from_model_id(make_config: Any) -> None:
    cost = CostModel(make_config())
    assert cost.cost_usd("claude-haiku-4-5-20251001", 1_000_000, 0, provider=None) == pytest.approx(1.0)


def test_long_context_tier_applies(make_config: Any) -> None:
    # Sonnet 4.5 charges its higher rate to all tokens once input exceeds 200k.
    cost = CostModel(make_config())
    calc = calc_price(
        Usage(input_tokens=300_000, output_tokens=0), model_ref="claude-sonnet-4-5", provider_id="anthropic"
    )
    got = cost.cost_usd("claude-sonnet-4-5-20250929", 300_000, 0, provider="anthropic")
    assert got == pytest.approx(float(calc.total_price))
    assert got is not None and got > 300_000 * 3 / 1e6


def test_cache_tokens_priced_at_cache_rate(make_config: Any) -> None:
    cost = CostModel(make_config())
    # 10k input of which 8k read from cache: 2k at $3, 8k at $0.30 per MTok.
    got = cost.cost_usd(
        "claude-sonnet-4-5-20250929", 10_000, 0, provider="anthropic", cache_read_tokens=8_000
    )
    assert got == pytest.approx((2_000 * 3 + 8_000 * 0.3) / 1e6)


def test_override_by_exact_id_wins(make_config: Any) -> None:
    cfg: Config = make_config(
        prices={"claude-sonnet-4-5-20250929": {"input_per_mtok": 1.5, "output_per_mtok": 2.5}}
    )
    cost = CostModel(cfg)
    assert cost.cost_usd("claude-sonnet-4-5-20250929", 1_000_000, 2_000_000, provider="anthropic") == (
        pytest.approx(1.5 + 5.0)
    )
    # Other models keep catalogue prices.
    assert cost.cost_usd("claude-haiku-4-5-20251001", 1_000_000, 0, provider="anthropic") == pytest.approx(
        1.0
    )


def test_override_by_canonical_id_applies_to_dated_id(make_config: Any) -> None:
    cfg = make_config(prices={"claude-opus-4-1": {"input_per_mtok": 10, "output_per_mtok": 20}})
    cost = CostModel(cfg)
    assert cost.cost_usd("claude-opus-4-1-20250805", 1_000_000, 1_000_000, provider="anthropic") == (
        pytest.approx(30.0)
    )


def test_override_prices_an_unknown_model(make_config: Any) -> None:
    cost = CostModel(make_config(prices={"my-finetune": {"input_per_mtok": 4, "output_per_mtok": 8}}))
    assert cost.cost_usd("my-finetune", 500_000, 250_000, provider=None) == pytest.approx(4.0)


def test_local_ollama_models_cost_nothing(make_config: Any) -> None:
    cost = CostModel(make_config())
    assert cost.cost_usd("qwen3:8b", 123_456, 7_890, provider="ollama") == 0.0
    # Even a model the catalogue knows elsewhere is free when it runs locally.
    assert cost.cost_usd("claude-sonnet-4-5", 1000, 1000, provider="ollama") == 0.0


def test_override_wins_over_local_zero(make_config: Any) -> None:
    cost = CostModel(make_config(prices={"qwen3:8b": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}))
    assert cost.cost_usd("qwen3:8b", 1_000_000, 1_000_000, provider="ollama") == pytest.approx(0.3)


def test_equivalent_claude_cost_uses_baseline(make_config: Any) -> None:
    cost = CostModel(make_config())  # default baseline: claude-sonnet-4-5
    assert cost.equivalent_claude_cost(100_000, 10_000) == pytest.approx((100_000 * 3 + 10_000 * 15) / 1e6)
    opus = CostModel(make_config(claude={"baseline_model": "claude-opus-4-1-20250805"}))
    assert opus.equivalent_claude_cost(100_000, 10_000) == pytest.approx((100_000 * 15 + 10_000 * 75) / 1e6)


def test_unknown_model_is_none_and_logged_once(make_config: Any, logs: Logs) -> None:
    cost = CostModel(make_config())
    assert cost.cost_usd("claude", 1000, 1000, provider="anthropic") is None
    assert cost.cost_usd("claude", 5, 5, provider="anthropic") is None
    assert cost.cost_usd("no-such-model-xyz", 1, 1, provider=None) is None
    assert [e["model"] for e in logs.named("price_unknown")] == ["claude", "no-such-model-xyz"]


def test_unknown_provider_is_none(make_config: Any) -> None:
    cost = CostModel(make_config())
    assert cost.cost_usd("claude-sonnet-4-5", 1, 1, provider="not-a-provider") is None


def test_unknown_baseline_gives_none(make_config: Any) -> None:
    cost = CostModel(make_config(claude={"baseline_model": "claude-sonnet-9-typo"}))
    assert cost.equivalent_claude_cost(1000, 1000) is None


def test_negative_counts_are_clamped(make_config: Any) -> None:
    cost = CostModel(make_config())
    assert cost.cost_usd("claude-haiku-4-5", -5, -5, provider="anthropic") == 0.0


def test_no_network_at_run_time(make_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cost = CostModel(make_config())
    for model in PUBLISHED:
        assert cost.cost_usd(model, 1000, 1000, provider="anthropic")
    assert cost.cost_usd("claude-opus-4-5", 1000, 1000, provider=None)
    assert attempts == []
    # Prices come from the bundled snapshot, not an auto-updated one.
    calc = calc_price(Usage(input_tokens=1, output_tokens=1), model_ref="claude-haiku-4-5")
    assert calc.auto_update_timestamp is None
