"""Test-time strategies: one interface (``strategies.base.Strategy``), one module each."""

from __future__ import annotations

from typing import Any

from strategies.base import Strategy


def builtin_strategies() -> list[type[Strategy[Any]]]:
    """Every strategy sharpen ships, imported here so modules stay independent."""
    from strategies.auto import Auto
    from strategies.best_of_n import BestOfN
    from strategies.critique_refine import CritiqueRefine
    from strategies.mcts import MCTS
    from strategies.passthrough import Passthrough
    from strategies.self_consistency import SelfConsistency

    return [Passthrough, SelfConsistency, BestOfN, CritiqueRefine, MCTS, Auto]
