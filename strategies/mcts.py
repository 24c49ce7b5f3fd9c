"""Monte Carlo tree search over reasoning steps, as a black box over the upstream (after
AlphaLLM's search and rStar; sharpen has no trained value model).

Nodes are reasoning steps (a generation split on newlines or "Step k:"). Each iteration selects
up to ``parallel`` leaves by UCT (with a virtual loss so they differ), expands each with ``k``
next-step continuations in ONE ``n=k`` call, scores every new leaf with the configured reward,
and backpropagates. All expansions, then all evaluations, of one iteration run concurrently.
Near-duplicate steps are merged. The answer is the best complete path.
"""

from __future__ import annotations

import asyncio
import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from server.errors import InvalidRequest, SharpenError
from server.wire import ChatCompletionRequest
from strategies.answers import extract
from strategies.base import (
    AnyRequest,
    Candidate,
    Caps,
    Strategy,
    StrategyContext,
    StrategyOptions,
    StrategyResult,
    Uncertainty,
)
from strategies.verifiers.aspect import parse_verdict, verdict_probability

_NUMBERS = re.compile(r"-?\d+(?:[.,]\d+)*")
_STEP_SPLIT = re.compile(r"\n+|(?=\bStep \d+:)")
_SYSTEM = ("Solve the problem step by step. Write one step per line. When you know the result, end with a line "
           "'The answer is X.'")


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


class MCTSOptions(StrategyOptions):
    iterations: int = Field(default=4, ge=1, le=64)
    k: int = Field(default=3, ge=1, le=16)  # continuations per expansion, in one n=k call
    parallel: int = Field(default=2, ge=1, le=16)  # leaves expanded concurrently per iteration
    max_depth: int = Field(default=8, ge=1, le=64)
    c_uct: float = Field(default=1.4, ge=0)
    reward: Literal["verifier", "self_consistency", "logprob"] = "self_consistency"
    step_tokens: int = Field(default=256, ge=8, le=4096)
    temperature: float = Field(default=0.8, gt=0, le=2)
    merge_similarity: float = Field(default=0.92, ge=0, le=1)


class MCTS(Strategy):
    """UCT search over step-by-step continuations; returns the best complete path."""

    name = "mcts"
    Options = MCTSOptions

    @property
    def opts(self) -> MCTSOptions:
        o: MCTSOptions = self.options  # type: ignore[assignment]
        return o

    def check(self, caps: Caps) -> None:
        super().check(caps)
        o = self.opts
        if o.k > caps.max_n:
            raise InvalidRequest(f"k is capped at {caps.max_n} on this server.", param="strategy.k")
        if o.reward != "self_consistency" and o.iterations * o.parallel * o.k > caps.max_verifier_calls:
            raise InvalidRequest(f"iterations x parallel x k exceeds {caps.max_verifier_calls} reward calls.",
                                 param="strategy.iterations")

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.opts
        self._ids = 0
        self._votes: Counter[str] = Counter()
        root = self._new("", None)
        question = str(request.messages[-1].content or "")
        notes: list[str] = []
        last: dict[str, Any] = {}
        for _ in range(o.iterations):
            if ctx.remaining() <= 0 or _spent(ctx):
                notes.append("stopped early: deadline or token budget")
                break
            leaves = self._select(root, o.parallel)
            if not leaves:
                break
            try:
                results = await asyncio.gather(*(self._expand(leaf, request, ctx) for leaf in leaves),
                                               return_exceptions=True)
            finally:
                self._clear_virtual(root)
            expansions = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and not expansions:
                if root.children:
                    notes.append(f"expansion failed, search stopped: {errors[0]}")
                    break
                raise errors[0]
            new = [n for batch in expansions for n in batch[0]]
            last = next((b[1] for b in expansions if b[1]), last)
            values = await self._evaluate(new, root, question, ctx)
            for n, v in zip(new, values, strict=True):
                self._backprop(n, v)
        best = self._best(root)
        if best is None:
            notes.append("no complete path: finishing the most promising one")
            best = await self._finish(root, request, ctx, notes)
        content = "\n".join(best.path()) if best is not None else ""
        complete = self._complete(root)
        total = sum(self._votes.values())
        share = self._votes[best.answer] / total if best is not None and best.answer and total else 0.0
        response = {"id": last.get("id", "chatcmpl-sharpen-mcts"), "object": "chat.completion",
                    "created": last.get("created", 0), "model": last.get("model", ctx.model),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop", "logprobs": None}]}
        cands = [Candidate(index=i, content="\n".join(n.path()), answer=n.answer,
                           scores={"value": round(n.mean(), 4), "visits": n.visits}) for i, n in enumerate(complete)]
        return StrategyResult(response=response, candidates=cands, notes=notes,
                              uncertainty=Uncertainty(score=1.0 - share, agreement=share),
                              extra_trace={"tree": self._dump(root), "nodes": self._ids})

    def _new(self, step: str, parent: Node | None) -> Node:
        node = Node(id=self._ids, step=step, parent=parent)
        self._ids += 1
        if parent is not None:
            parent.children.append(node)
            node.answer = extract(step) if re.search(r"answer|\\boxed", step, re.IGNORECASE) else None
        return node

    def _uct(self, node: Node) -> float:
        visits = node.visits + node.virtual
        if visits == 0:
            return math.inf
        parent_visits = max((node.parent.visits if node.parent else 1), 1)
        return node.mean() - node.virtual + self.opts.c_uct * math.sqrt(math.log(parent_visits + 1) / visits)

    def _select(self, root: Node, want: int) -> list[Node]:
        """Up to ``want`` distinct unexpanded leaves, by UCT; a virtual loss on each chosen path
        steers the next descent elsewhere."""
        chosen: list[Node] = []
        for _ in range(want):
            node: Node | None = root
            path: list[Node] = []
            while node is not None and node.expanded:
                path.append(node)
                open_children = [c for c in node.children if self._has_open(c)]
                node = max(open_children, key=self._uct) if open_children else None
            if node is None or node in chosen:
                continue
            for n in (*path, node):
                n.virtual += 1
            chosen.append(node)
        return chosen

    def _has_open(self, node: Node) -> bool:
        """Whether ``node``'s subtree still has a leaf to expand (not an answer, not at max depth):
        a descent into a finished subtree would find nothing and end the search early."""
        if node.terminal or node.depth >= self.opts.max_depth:
            return False
        return not node.expanded or any(self._has_open(c) for c in node.children)

    @staticmethod
    def _clear_virtual(root: Node) -> None:
        stack = [root]
        while stack:
            n = stack.pop()
            n.virtual = 0
            stack.extend(n.children)

    async def _expand(self, leaf: Node, request: ChatCompletionRequest, ctx: StrategyContext
                      ) -> tuple[list[Node], dict[str, Any]]:
        """k continuations in one call; each is split into steps and added as a chain."""
        o = self.opts
        steps = leaf.path()
        msgs = [{"role": "system", "content": _SYSTEM}] + [m.model_dump(exclude_none=True) for m in request.messages]
        if steps:
            msgs.append({"role": "user", "content": "Steps so far:\n" + "\n".join(steps) + "\nContinue from here."})
        body = {"model": ctx.model, "messages": msgs, "n": o.k, "max_tokens": o.step_tokens,
                "temperature": o.temperature}
        data = await ctx.chat(body, purpose="expand")
        leaf.expanded = True
        new: list[Node] = []
        for ch in data.get("choices", []):
            text = str((ch.get("message") or {}).get("content") or "")
            parts = [p.strip() for p in _STEP_SPLIT.split(text) if p and p.strip()]
            parts = parts[: max(o.max_depth - leaf.depth, 1)]
            node = leaf
            for j, part in enumerate(parts):
                node = self._merge_or_add(node, part)
                if node.terminal:
                    break
                if j < len(parts) - 1:
                    node.expanded = True  # its continuation is the next step of this chain
            if node is not leaf:
                new.append(node)  # a merged duplicate counts again: it is more evidence
                if node.answer is not None:
                    self._votes[node.answer] += 1
        return new, data

    def _merge_or_add(self, parent: Node, step: str) -> Node:
        """Reuses a sibling that says the same thing: near-identical wording AND the same numbers
        (steps that differ only in a number are different steps)."""
        nums = _NUMBERS.findall(step)
        for c in parent.children:
            if c.step == step or (_NUMBERS.findall(c.step) == nums and
                                  difflib.SequenceMatcher(None, c.step, step).ratio() >= self.opts.merge_similarity):
                return c
        return self._new(step, parent)

    async def _evaluate(self, nodes: list[Node], root: Node, question: str, ctx: StrategyContext) -> list[float]:
        o = self.opts
        if o.reward == "self_consistency":
            total = sum(self._votes.values())
            return [self._votes[n.answer] / total if n.answer and total else 0.0 for n in nodes]
        return list(await asyncio.gather(*(self._judge(n, question, ctx) for n in nodes)))

    async def _judge(self, node: Node, question: str, ctx: StrategyContext) -> float:
        """Verifier approval (P(True)) or P("Yes") that the steps so far are correct."""
        steps = "\n".join(node.path())
        if self.opts.reward == "verifier":
            ask = ("Is this reasoning correct so far? End with 'FINAL VERIFICATION ANSWER: True' or "
                   "'FINAL VERIFICATION ANSWER: False'.")
        else:
            ask = "Is every step above correct? Answer with only Yes or No."
        body = {"model": ctx.model, "messages": [{"role": "user", "content": f"Question:\n{question}\n\nSteps:\n"
                                                  f"{steps}\n\n{ask}"}],
                "max_tokens": 16, "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
        try:
            data = await ctx.chat(body, purpose="reward")
            ch = data["choices"][0]
        except (SharpenError, KeyError, IndexError, TypeError):
            return 0.0
        p = verdict_probability(ch.get("logprobs"))
        if p is not None:
            return p
        return 1.0 if parse_verdict((ch.get("message") or {}).get("content")) else 0.0

    @staticmethod
    def _backprop(node: Node | None, value: float) -> None:
        while node is not None:
            node.visits += 1
            node.value += value
            node = node.parent

    def _complete(self, root: Node) -> list[Node]:
        out, stack = [], [root]
        while stack:
            n = stack.pop()
            if n.terminal:
                out.append(n)
            stack.extend(n.children)
        return out

    def _best(self, root: Node) -> Node | None:
        done = self._complete(root)
        return max(done, key=lambda n: (n.mean(), n.visits)) if done else None

    async def _finish(self, root: Node, request: ChatCompletionRequest, ctx: StrategyContext,
                      notes: list[str]) -> Node | None:
        """No path reached an answer: follow the best visits to a leaf and complete it once."""
        node = root
        while node.children:
            node = max(node.children, key=lambda c: (c.mean(), c.visits))
        msgs = [{"role": "system", "content": _SYSTEM}] + [m.model_dump(exclude_none=True) for m in request.messages]
        if node.path():
            msgs.append({"role": "user", "content": "Steps so far:\n" + "\n".join(node.path()) +
                         "\nFinish the solution and end with 'The answer is X.'"})
        try:
            data = await ctx.chat({"model": ctx.model, "messages": msgs, "max_tokens": self.opts.step_tokens * 2,
                                   "temperature": 0.0}, purpose="finish")
        except SharpenError as exc:
            notes.append(f"finishing failed: {exc.message}")
            return node if node is not root else None
        text = str((data["choices"][0].get("message") or {}).get("content") or "")
        return self._new(text.strip(), node)

    def _dump(self, node: Node) -> dict[str, Any]:
        return {"id": node.id, "step": node.step[:200], "visits": node.visits, "value": round(node.mean(), 4),
                "answer": node.answer, "children": [self._dump(c) for c in node.children]}


def _spent(ctx: StrategyContext) -> bool:
    return ctx.max_upstream_tokens is not None and ctx.usage.total_tokens >= ctx.max_upstream_tokens
