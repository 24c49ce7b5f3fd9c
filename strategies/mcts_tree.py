"""The search tree of ``mcts``: reasoning steps as nodes, UCT selection with a virtual loss,
merging of near-duplicate steps, backpropagation and the final answer (a vote over the
complete paths). No upstream calls
here; the search (``strategies.mcts``) drives it."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from strategies.answers import extract
from strategies.base import Candidate
from strategies.selection import WeightedVote, rank

_NUMBERS = re.compile(r"-?\d+(?:[.,]\d+)*")


@dataclass
class Node:
    """A reasoning step in the tree."""

    id: int
    step: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    answer: str | None = None
    virtual: int = 0
    expanded: bool = False

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def terminal(self) -> bool:
        return self.answer is not None

    def path(self) -> list[str]:
        out: list[str] = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            out.append(n.step)
            n = n.parent
        return out[::-1]

    def mean(self) -> float:
        return self.value / self.visits if self.visits else 0.0


class Tree:
    """One search's tree, with the answer votes its complete paths cast."""

    def __init__(self, *, c_uct: float, max_depth: int, merge_similarity: float) -> None:
        self.c_uct = c_uct
        self.max_depth = max_depth
        self.merge_similarity = merge_similarity
        self.ids = 0
        self.votes: Counter[str] = Counter()
        self.root = self.new("", None)

    def new(self, step: str, parent: Node | None) -> Node:
        node = Node(id=self.ids, step=step, parent=parent)
        self.ids += 1
        if parent is not None:
            parent.children.append(node)
            node.answer = extract(step) if re.search(r"answer|\\boxed", step, re.IGNORECASE) else None
        return node

    def uct(self, node: Node) -> float:
        visits = node.visits + node.virtual
        if visits == 0:
            return math.inf
        parent_visits = max((node.parent.visits if node.parent else 1), 1)
        return node.mean() - node.virtual + self.c_uct * math.sqrt(math.log(parent_visits + 1) / visits)

    def select(self, want: int) -> list[Node]:
        """Up to ``want`` distinct unexpanded leaves, by UCT; a virtual loss on each chosen path
        steers the next descent elsewhere."""
        chosen: list[Node] = []
        for _ in range(want):
            node: Node | None = self.root
            path: list[Node] = []
            while node is not None and node.expanded:
                path.append(node)
                open_children = [c for c in node.children if self.has_open(c)]
                node = max(open_children, key=self.uct) if open_children else None
            if node is None or node in chosen:
                continue
            for n in (*path, node):
                n.virtual += 1
            chosen.append(node)
        return chosen

    def has_open(self, node: Node) -> bool:
        """Whether ``node``'s subtree still has a leaf to expand (not an answer, not at max depth):
        a descent into a finished subtree would find nothing and end the search early."""
        if node.terminal or node.depth >= self.max_depth:
            return False
        return not node.expanded or any(self.has_open(c) for c in node.children)

    def clear_virtual(self) -> None:
        stack = [self.root]
        while stack:
            n = stack.pop()
            n.virtual = 0
            stack.extend(n.children)

    def add_chain(self, leaf: Node, text: str, split: re.Pattern[str]) -> Node:
        """Adds one continuation of ``leaf``, split into steps, as a chain; returns its last node
        (``leaf`` itself when the text held no step). A new answer casts a vote."""
        parts = [p.strip() for p in split.split(text) if p and p.strip()]
        parts = parts[: max(self.max_depth - leaf.depth, 1)]
        node = leaf
        for j, part in enumerate(parts):
            node = self.merge_or_add(node, part)
            if node.terminal:
                break
            if j < len(parts) - 1:
                node.expanded = True  # its continuation is the next step of this chain
        if node is not leaf and node.answer is not None:
            self.votes[node.answer] += 1
        return node

    def merge_or_add(self, parent: Node, step: str) -> Node:
        """Reuses a sibling that says the same thing: near-identical wording AND the same numbers
        (steps that differ only in a number are different steps)."""
        nums = _NUMBERS.findall(step)
        for c in parent.children:
            if c.step == step or (_NUMBERS.findall(c.step) == nums and
                                  difflib.SequenceMatcher(None, c.step, step).ratio() >= self.merge_similarity):
                return c
        return self.new(step, parent)

    def vote_share(self, node: Node) -> float:
        total = sum(self.votes.values())
        return self.votes[node.answer] / total if node.answer and total else 0.0

    @staticmethod
    def backprop(node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.value += value
            node = node.parent

    def complete(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if n.terminal:
                out.append(n)
            stack.extend(n.children)
        return out

    def best(self) -> Node | None:
        """The answer the complete paths vote for, each weighted by softmax(value / 0.1) (the same
        answer-group vote as the other strategies); inside it, the best-valued path."""
        done = sorted(self.complete(), key=lambda n: (-n.mean(), -n.visits))
        if not done:
            return None
        cands = [Candidate(index=i, content="", answer=n.answer, verdicts={"value": {"score": n.mean()}})
                 for i, n in enumerate(done)]
        ranked, _ = rank(cands, WeightedVote(weights={"value": 1.0}, temperature=0.1))
        return done[ranked[0].index]

    def most_promising_leaf(self) -> Node:
        node = self.root
        while node.children:
            node = max(node.children, key=lambda c: (c.mean(), c.visits))
        return node

    def dump(self, node: Node | None = None) -> dict[str, Any]:
        node = node or self.root
        return {"id": node.id, "step": node.step[:200], "visits": node.visits, "value": round(node.mean(), 4),
                "answer": node.answer, "children": [self.dump(c) for c in node.children]}
