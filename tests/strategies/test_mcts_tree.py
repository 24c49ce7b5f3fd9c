"""strategies/mcts_tree.py, and the search run in-process over the fake transport (no HTTP)."""

from __future__ import annotations

import re
from typing import Any

from protocol.wire import ChatCompletionRequest
from strategies.mcts import MCTS, MCTSOptions
from strategies.mcts_tree import Tree
from tests.fakes.transport import FakeAPI

SPLIT = re.compile(r"\n+")


def _tree() -> Tree:
    return Tree(c_uct=1.4, max_depth=4, merge_similarity=0.9)


def test_chains_merge_near_duplicates_but_not_different_numbers() -> None:
    t = _tree()
    a = t.add_chain(t.root, "Add 3 and 4.\nThe answer is 7.", SPLIT)
    b = t.add_chain(t.root, "Add 3 and 4.\nThe answer is 7.", SPLIT)
    c = t.add_chain(t.root, "Add 3 and 5.\nThe answer is 8.", SPLIT)
    assert a is b and a is not c
    assert len(t.root.children) == 2 and t.votes == {"7": 2, "8": 1}
    assert a.path() == ["Add 3 and 4.", "The answer is 7."]


def test_select_spreads_over_distinct_leaves_and_backprop_reaches_the_root() -> None:
    t = _tree()
    t.root.expanded = True
    x = t.add_chain(t.root, "step one", SPLIT)
    y = t.add_chain(t.root, "another first step", SPLIT)
    chosen = t.select(2)
    assert sorted(n.id for n in chosen) == sorted([x.id, y.id])
    t.clear_virtual()
    t.backprop(x, 1.0)
    assert (t.root.visits, t.root.value, x.mean()) == (1, 1.0, 1.0)


async def test_the_search_answers_with_the_best_complete_path_in_process() -> None:
    api = FakeAPI(lambda body, i: "Add 3 and 4.\nThe answer is 7." if i < 2 else "Guess.\nThe answer is 8.")
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    result = await MCTS(MCTSOptions(iterations=2, k=3, parallel=1)).run(req, api.context({"messages": []}))
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"].endswith("The answer is 7.")
    assert result.response["object"] == "chat.completion"
    assert result.uncertainty is not None and 0 < result.uncertainty.score < 0.5
    bodies: list[dict[str, Any]] = api.requests
    assert bodies and all(b["n"] == 3 for b in bodies)  # k continuations in one n=k call


def test_the_final_answer_is_the_path_vote_not_the_single_best_path() -> None:
    """Two complete paths agree on 5 with good values; one says 6 with a slightly better value:
    the answer-group vote over the paths returns a 5 path (the best-valued of them)."""
    t = Tree(c_uct=1.4, max_depth=4, merge_similarity=0.9)
    for step, value in (("The answer is 5.", 0.80), ("So the answer is 5.", 0.82), ("The answer is 6.", 0.85)):
        node = t.new(step, t.root)
        node.visits, node.value = 1, value
    best = t.best()
    assert best is not None and best.answer == "5" and best.step == "So the answer is 5."
    # one path each: the best value wins, as before
    t.root.children.pop(0)
    t.root.children[0].value = 0.5
    assert (t.best() or t.root).answer == "6"
