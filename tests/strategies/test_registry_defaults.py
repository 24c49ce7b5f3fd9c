"""Configured strategy defaults (calibrated weights) are checked when the server starts."""

from __future__ import annotations

import pytest

from server.app import create_app
from server.settings import load_settings
from strategies.best_of_n import BestOfN
from strategies.registry import StrategyRegistry
from strategies.self_consistency import SelfConsistency

REG = StrategyRegistry([BestOfN, SelfConsistency])


def test_good_defaults_pass() -> None:
    REG.check_defaults({"best_of_n": {"verifiers": ["confidence", "approval"], "weights": {"approval": 0.3},
                                      "vote_temperature": 0.2}})


@pytest.mark.parametrize(("defaults", "needle"), [
    ({"best_of_n": {"weights": {"aproval": 1.0}}}, "strategies.options.best_of_n"),
    ({"best_of_n": {"weights": {"approval": -1.0}}}, "at least 0"),
    ({"best_of_n": {"vote_temperature": 0}}, "vote_temperature"),
    ({"best_of_n": {"pal": 9, "n": 8}}, "pal"),
    ({"best_of_nn": {}}, "unknown strategy 'best_of_nn'"),
])
def test_bad_defaults_are_a_clear_error(defaults: dict[str, dict[str, object]], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        REG.check_defaults(defaults)  # type: ignore[arg-type]


def test_the_server_refuses_to_start_with_bad_weights(tmp_path: object) -> None:
    settings = load_settings(upstream={"url": "http://127.0.0.1:9/v1"}, data_dir=str(tmp_path),
                             strategies={"options": {"best_of_n": {"weights": {"approval": -2}}}})
    with pytest.raises(ValueError, match=r"strategies\.options\.best_of_n"):
        create_app(settings)
