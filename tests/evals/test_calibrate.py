"""Choosing auto's probe threshold from eval results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evals.calibrate import calibrate, calibrate_weights
from server.cli import main

AUTO = "auto:agree_threshold=1.01"
# (probe agreement, probe right, best_of_n right, greedy right) per item
ITEMS = ([(1.0, 1, 1, 1)] * 4 + [(2 / 3, 1, 1, 0)] * 2 + [(2 / 3, 0, 1, 0)] * 2 + [(1 / 3, 0, 0, 0)] * 2)
PROBE_TOKENS, BON_TOKENS = 30, 300


def _records(*, greedy: bool = True, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, (agree, probe_ok, bon_ok, greedy_ok) in enumerate(ITEMS):
        out.append({"strategy": AUTO, "item": f"i{j}", "correct": float(bon_ok), "tokens": BON_TOKENS, "calls": 10,
                    "wall_s": 1.0, "escalated": True, "probe_agreement": agree, "probe_tokens": PROBE_TOKENS,
                    "probe_correct": float(probe_ok)})
        if greedy:
            out.append({"strategy": "passthrough", "item": f"i{j}", "correct": float(greedy_ok), "tokens": 20,
                        "calls": 1, "wall_s": 0.1})
    return out + (extra or [])


def _write(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_options_estimate_accuracy_and_tokens(tmp_path: Path) -> None:
    got = calibrate(_write(tmp_path, _records()))
    assert got["items"] == 10
    assert got["best_of_n_accuracy"] == pytest.approx(0.8)
    assert got["greedy_accuracy"] == pytest.approx(0.4)
    assert got["best_of_n_tokens_per_item"] == BON_TOKENS
    opts = {round(o["agree_threshold"], 3): o for o in got["options"]}
    assert sorted(opts) == [0.333, 0.667, 1.0, 1.01]
    assert opts[0.333]["accuracy"] == pytest.approx(0.6)  # the probe alone, everywhere
    assert opts[0.333]["tokens_per_item"] == PROBE_TOKENS
    assert opts[0.667]["accuracy"] == pytest.approx(0.6)
    assert opts[1.0]["accuracy"] == pytest.approx(0.8)
    assert opts[1.0]["tokens_per_item"] == pytest.approx((4 * PROBE_TOKENS + 6 * BON_TOKENS) / 10)
    assert opts[1.01] == {"agree_threshold": 1.01, "accuracy": pytest.approx(0.8), "tokens_per_item": BON_TOKENS,
                          "token_share": 1.0}
    assert opts[1.0]["token_share"] == pytest.approx(192 / 300)


@pytest.mark.parametrize(("gain", "threshold", "floor"), [
    (0.9, 1.0, 0.76),     # keep 90% of the 0.4 -> 0.8 gain: only full agreement may skip escalation
    (0.5, 1 / 3, 0.6),    # keep half: the probe alone suffices, at the fewest tokens
    (1.0, 1.0, 0.8),
])
def test_choice_meets_the_gain_floor_at_the_fewest_tokens(tmp_path: Path, gain: float, threshold: float,
                                                          floor: float) -> None:
    got = calibrate(_write(tmp_path, _records()), gain=gain)
    assert got["required_accuracy"] == pytest.approx(floor)
    choice = got["choice"]
    assert choice["agree_threshold"] == pytest.approx(threshold)
    assert choice["accuracy"] >= floor - 1e-9
    meeting = [o for o in got["options"] if o["accuracy"] >= floor - 1e-9]
    assert choice["tokens_per_item"] == min(o["tokens_per_item"] for o in meeting)
    assert got["config"] == {"strategies": {"options": {"auto": {"agree_threshold": choice["agree_threshold"]}}}}


def test_without_greedy_the_floor_is_best_of_ns_accuracy(tmp_path: Path) -> None:
    got = calibrate(_write(tmp_path, _records(greedy=False)))
    assert got["greedy_accuracy"] is None
    assert got["required_accuracy"] == pytest.approx(0.8)
    assert got["choice"]["agree_threshold"] == 1.0


def test_an_unreachable_floor_takes_the_most_accurate(tmp_path: Path) -> None:
    got = calibrate(_write(tmp_path, _records()), gain=1.5)
    assert got["choice"]["accuracy"] == pytest.approx(0.8)


def test_auto_label_picks_one_auto_run(tmp_path: Path) -> None:
    other = [{"strategy": "auto:n=4", "item": f"i{j}", "correct": 0.0, "tokens": 1, "calls": 1, "wall_s": 0.1,
              "probe_agreement": 1.0, "probe_tokens": 1, "probe_correct": 0.0} for j in range(10)]
    path = _write(tmp_path, _records(extra=other))
    assert calibrate(path, auto_label=AUTO)["items"] == 10
    assert calibrate(path)["items"] == 20  # by default every auto run's records
    with pytest.raises(ValueError):
        calibrate(path, auto_label="auto:nope")


def test_no_probe_data_is_an_error(tmp_path: Path) -> None:
    plain = [r for r in _records() if r["strategy"] == "passthrough"]
    with pytest.raises(ValueError, match=r"agree_threshold=1\.01"):
        calibrate(_write(tmp_path, plain))
    with pytest.raises(ValueError):
        calibrate(_write(tmp_path, []))


def test_the_command_prints_the_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _records())
    assert main(["calibrate", "--results", str(path), "--gain", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choice"]["agree_threshold"] == pytest.approx(1 / 3)
    assert "options" not in out


# ---- best_of_n's verifier weights (issue 12) --------------------------------------------------


def _bon_records(n_items: int = 40) -> list[dict[str, Any]]:
    """best_of_n results whose candidates carry a useful "confidence" and a useless "approval"."""
    import random

    rng = random.Random(3)
    out = []
    for j in range(n_items):
        cands = []
        for _ in range(6):
            right = rng.random() < 0.4
            ans = "r" if right else rng.choice(["a", "a", "b"])
            cands.append({"answer": ans, "correct": float(right),
                          "scores": {"confidence": (0.8 if right else 0.4) + rng.gauss(0, 0.1),
                                     "approval": rng.random()}})
        out.append({"strategy": "best_of_n", "item": f"i{j}", "correct": 0.0, "tokens": 1, "calls": 1,
                    "wall_s": 0.1, "candidates": cands})
    return out


def test_weights_from_labelled_candidates(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _bon_records()))
    out = calibrate_weights(path)
    assert out["weights"]["confidence"] > 5 * out["weights"]["approval"]
    section = out["config"]["strategies"]["options"]["best_of_n"]
    assert "confidence" in section["verifiers"] and section["vote_temperature"] > 0
    assert out["training_accuracy"] >= out["majority_accuracy"]
    assert calibrate_weights(path, labelled=False)["labelled"] is False


def test_weights_need_candidates(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"strategy": "passthrough", "item": "i", "correct": 1.0}) + "\n")
    with pytest.raises(ValueError, match="per-candidate"):
        calibrate_weights(path)


def test_calibrate_weights_cli_writes_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _bon_records()))
    cfg = tmp_path / "weights.yaml"
    assert main(["calibrate", "--results", str(path), "--weights", "--write", str(cfg)]) == 0
    written = yaml.safe_load(cfg.read_text())
    assert written["strategies"]["options"]["best_of_n"]["weights"]["confidence"] > 0
    assert json.loads(capsys.readouterr().out)["items"] == 40
