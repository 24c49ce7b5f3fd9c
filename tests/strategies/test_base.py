"""strategies/base.py: the client's ``n`` checked once against each strategy's limit, with the
same 400 everywhere; ``check`` free of side effects; ``fit`` lowering only unset defaults."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import InvalidRequest
from protocol.wire import ChatCompletionRequest
from strategies import builtin_strategies
from strategies.base import Caps
from strategies.registry import StrategyRegistry

REGISTRY = StrategyRegistry(builtin_strategies())
LIMITS = {"passthrough": None, "self_consistency": 8, "best_of_n": 8, "auto": 3, "critique_refine": 1, "mcts": 1}


def _req(n: int | None) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "q"}], "n": n})


@pytest.mark.parametrize(("name", "limit"), LIMITS.items())
def test_every_strategy_refuses_an_n_it_cannot_serve_the_same_way(name: str, limit: int | None) -> None:
    strategy = REGISTRY.build(name)
    assert strategy.max_choices() == limit
    strategy.admit(_req(limit or 5))  # at the limit: fine
    if limit is None:
        return
    with pytest.raises(InvalidRequest) as err:
        strategy.admit(_req(limit + 1))
    assert err.value.param == "n" and err.value.status == 400
    assert err.value.message == (f"n={limit + 1} choices asked for, but the strategy '{name}' returns at most "
                                 f"{limit}.")


def test_every_builtin_strategy_is_covered() -> None:
    assert set(REGISTRY.names()) == set(LIMITS)


@pytest.mark.parametrize("name", ["self_consistency", "best_of_n"])
def test_fit_lowers_unset_defaults_and_check_changes_nothing(name: str) -> None:
    caps = Caps(max_n=4, max_verifier_calls=8)
    strategy = REGISTRY.build(name, caps=caps)
    assert strategy.options.n <= 4
    before: dict[str, Any] = strategy.options.model_dump()
    strategy.check(caps)
    strategy.check(Caps())
    assert strategy.options.model_dump() == before
    with pytest.raises(InvalidRequest) as err:  # an explicit n over the cap is the client's to fix
        REGISTRY.build({"name": name, "n": 5}, caps=caps)
    assert err.value.param in ("strategy.n", "strategy.verifiers")
