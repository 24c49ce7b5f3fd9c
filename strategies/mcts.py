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
import re
from typing import Any, Literal

from pydantic import Field

from protocol.errors import InvalidRequest, SharpenError
from protocol.uncertainty import Uncertainty
from protocol.wire import ChatCompletionRequest
from strategies.base import AnyRequest, Candidate, Caps, Strategy, StrategyContext, StrategyOptions, StrategyResult
from strategies.chat import completion, first_text, question
from strategies.mcts_tree import Node, Tree
from strategies.verifiers.aspect import parse_verdict, verdict_probability

_STEP_SPLIT = re.compile(r"\n+|(?=\bStep \d+:)")
_SYSTEM = ("Solve the problem step by step. Write one step per line. When you know the result, end with a line "
           "'The answer is X.'")


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


class MCTS(Strategy[MCTSOptions]):
    """UCT search over step-by-step continuations; returns the best complete path."""

    name = "mcts"
    Options = MCTSOptions

    def check(self, caps: Caps) -> None:
        super().check(caps)
        o = self.options
        if o.k > caps.max_n:
            raise InvalidRequest(f"k is capped at {caps.max_n} on this server.", param="strategy.k")
        if o.reward != "self_consistency" and o.iterations * o.parallel * o.k > caps.max_verifier_calls:
            raise InvalidRequest(f"iterations x parallel x k exceeds {caps.max_verifier_calls} reward calls.",
                                 param="strategy.iterations")

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        assert isinstance(request, ChatCompletionRequest)
        o = self.options
        tree = Tree(c_uct=o.c_uct, max_depth=o.max_depth, merge_similarity=o.merge_similarity)
        asked = question(request)
        notes: list[str] = []
        last: dict[str, Any] = {}
        for _ in range(o.iterations):
            if ctx.remaining() <= 0 or _spent(ctx):
                notes.append("stopped early: deadline or token budget")
                break
            leaves = tree.select(o.parallel)
            if not leaves:
                break
            try:
                results = await asyncio.gather(*(self._expand(tree, leaf, request, ctx) for leaf in leaves),
                                               return_exceptions=True)
            finally:
                tree.clear_virtual()
            expansions = [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors and not expansions:
                if tree.root.children:
                    notes.append(f"expansion failed, search stopped: {errors[0]}")
                    break
                raise errors[0]
            new = [n for batch in expansions for n in batch[0]]
            last = next((b[1] for b in expansions if b[1]), last)
            values = await self._evaluate(tree, new, asked, ctx)
            for n, v in zip(new, values, strict=True):
                tree.backprop(n, v)
        best = tree.best()
        if best is None:
            notes.append("no complete path: finishing the most promising one")
            best = await self._finish(tree, request, ctx, notes)
        content = "\n".join(best.path()) if best is not None else ""
        share = tree.vote_share(best) if best is not None else 0.0
        cands = [Candidate(index=i, content="\n".join(n.path()), answer=n.answer,
                           scores={"value": round(n.mean(), 4), "visits": n.visits})
                 for i, n in enumerate(tree.complete())]
        return StrategyResult(response=completion(content, like=last, model=ctx.model), candidates=cands,
                              notes=notes, uncertainty=Uncertainty(score=1.0 - share, agreement=share),
                              extra_trace={"tree": tree.dump(), "nodes": tree.ids})

    @staticmethod
    def _messages(request: ChatCompletionRequest, steps: list[str], ask: str) -> list[dict[str, Any]]:
        msgs = [{"role": "system", "content": _SYSTEM}] + [m.model_dump(exclude_none=True) for m in request.messages]
        if steps:
            msgs.append({"role": "user", "content": "Steps so far:\n" + "\n".join(steps) + ask})
        return msgs

    async def _expand(self, tree: Tree, leaf: Node, request: ChatCompletionRequest, ctx: StrategyContext
                      ) -> tuple[list[Node], dict[str, Any]]:
        """k continuations in one call; each is split into steps and added as a chain."""
        o = self.options
        body = {"model": ctx.model, "messages": self._messages(request, leaf.path(), "\nContinue from here."),
                "n": o.k, "max_tokens": o.step_tokens, "temperature": o.temperature}
        data = await ctx.chat(body, purpose="expand")
        leaf.expanded = True
        new: list[Node] = []
        for ch in data.get("choices", []):
            node = tree.add_chain(leaf, str((ch.get("message") or {}).get("content") or ""), _STEP_SPLIT)
            if node is not leaf:
                new.append(node)  # a merged duplicate counts again: it is more evidence
        return new, data

    async def _evaluate(self, tree: Tree, nodes: list[Node], asked: str, ctx: StrategyContext) -> list[float]:
        if self.options.reward == "self_consistency":
            return [tree.vote_share(n) for n in nodes]
        return list(await asyncio.gather(*(self._judge(n, asked, ctx) for n in nodes)))

    async def _judge(self, node: Node, asked: str, ctx: StrategyContext) -> float:
        """Verifier approval (P(True)) or P("Yes") that the steps so far are correct."""
        steps = "\n".join(node.path())
        if self.options.reward == "verifier":
            ask = ("Is this reasoning correct so far? End with 'FINAL VERIFICATION ANSWER: True' or "
                   "'FINAL VERIFICATION ANSWER: False'.")
        else:
            ask = "Is every step above correct? Answer with only Yes or No."
        body = {"model": ctx.model, "messages": [{"role": "user", "content": f"Question:\n{asked}\n\nSteps:\n"
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

    async def _finish(self, tree: Tree, request: ChatCompletionRequest, ctx: StrategyContext,
                      notes: list[str]) -> Node | None:
        """No path reached an answer: follow the best visits to a leaf and complete it once."""
        node = tree.most_promising_leaf()
        msgs = self._messages(request, node.path(), "\nFinish the solution and end with 'The answer is X.'")
        try:
            data = await ctx.chat({"model": ctx.model, "messages": msgs, "max_tokens": self.options.step_tokens * 2,
                                   "temperature": 0.0}, purpose="finish")
        except SharpenError as exc:
            notes.append(f"finishing failed: {exc.message}")
            return node if node is not tree.root else None
        return tree.new(first_text(data).strip(), node)


def _spent(ctx: StrategyContext) -> bool:
    return ctx.max_upstream_tokens is not None and ctx.usage.total_tokens >= ctx.max_upstream_tokens
