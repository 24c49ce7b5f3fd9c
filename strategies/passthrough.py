"""The reference strategy: one upstream call with the client's body, answer passed on as is."""

from __future__ import annotations

from strategies.base import AnyRequest, Strategy, StrategyContext, StrategyOptions, StrategyResult


class Passthrough(Strategy[StrategyOptions]):
    """Sends the body upstream unchanged. Non-streamed answers come back byte for byte (the
    parsed copy in ``response`` is for events); streamed ones are relayed chunk by chunk as the
    upstream produces them."""

    name = "passthrough"
    streams_natively = True
    endpoints = frozenset({"/chat/completions", "/completions"})

    def max_choices(self) -> int | None:
        return None  # the upstream's own n

    async def run(self, request: AnyRequest, ctx: StrategyContext) -> StrategyResult:
        if request.stream:
            return StrategyResult(stream=await ctx.open_stream(ctx.body, purpose="answer", path=ctx.endpoint))
        raw, data = await ctx.post_raw(ctx.endpoint, ctx.body, purpose="answer")
        return StrategyResult(raw=raw, response=data)
