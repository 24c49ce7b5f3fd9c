"""Recall before the strategy: per-request memory options, and the injection of recalled
experiences as a compact system-message section within a token budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import InvalidRequest
from protocol.wire import ChatCompletionRequest, ChatMessage, first_problem, task_of
from server.settings import MemorySettings

if TYPE_CHECKING:  # the memory package pulls in numpy and faiss: only where memory is enabled
    from memory.service import Hit, MemoryService


def render_hits(hits: list[Hit], budget_tokens: int) -> str:
    """The system-message section that replays experiences, within ~``budget_tokens``."""
    budget = budget_tokens * 4  # ~4 characters a token for English text
    lines = ["Relevant past experience from this deployment (use it if it helps; it may not apply):"]
    used = len(lines[0])
    for n, h in enumerate(hits, 1):
        e = h.experience
        parts = [f"{n}. Task: {e.task.strip()}"]
        parts.append(("   Pitfall (this failed): " if e.kind == "pitfall" else "   Answer that worked: ")
                     + e.answer.strip())
        if e.insights:
            parts.append(f"   Insights: {e.insights.strip()}")
        if e.workflow:
            parts.append(f"   Workflow: {e.workflow.strip()}")
        block = "\n".join(parts)
        if used + len(block) > budget:
            block = block[: max(budget - used, 0)]
            if len(block) < 40:
                break
        lines.append(block)
        used += len(block)
    return "\n".join(lines) if len(lines) > 1 else ""


class MemoryOptions(BaseModel):
    """Body field ``memory``: ``true``/``false``, or ``{"recall", "remember", "k"}``."""

    model_config = ConfigDict(extra="forbid")

    recall: bool
    remember: bool
    k: int = Field(ge=1, le=32)


class Replay:
    """Decides what a request recalls and remembers, and injects what it recalls."""

    def __init__(self, memory: MemoryService | None, settings: MemorySettings) -> None:
        self.memory = memory
        self.settings = settings
        # Per tenant since start: requests that recalled, and those that got at least one memory.
        self.recalls: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def options(self, req: ChatCompletionRequest) -> MemoryOptions:
        s = self.settings
        asked = req.memory
        base = {"recall": s.recall, "remember": s.remember, "k": s.k}
        if asked is None:
            opts = base
        elif isinstance(asked, bool):
            opts = {**base, "recall": asked, "remember": asked}
        else:
            opts = {**base, **asked}
        try:
            out = MemoryOptions.model_validate(opts)
        except ValidationError as exc:
            field, msg, _ = first_problem(exc)
            raise InvalidRequest(f"Invalid memory option '{field}': {msg}.", param=f"memory.{field}") from None
        if self.memory is None and asked not in (None, False) and (out.recall or out.remember):
            raise InvalidRequest("Memory is not enabled on this server.", param="memory")
        return out

    async def inject(self, tenant: str, req: ChatCompletionRequest, body: dict[str, Any], k: int
                     ) -> tuple[ChatCompletionRequest, list[dict[str, Any]]]:
        """Recalls for the last user message; returns the request with the section injected
        (``body["messages"]`` updated too) and what was used, for the trace."""
        if self.memory is None:
            return req, []
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        hits = await self.memory.recall(tenant, task_of(messages), k=k, threshold=self.settings.threshold)
        section = render_hits(hits, self.settings.inject_tokens)
        self.recalls[tenant] = self.recalls.get(tenant, 0) + 1
        if section:
            self.hits[tenant] = self.hits.get(tenant, 0) + 1
        if not section:
            return req, []
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + section}
        else:
            messages.insert(0, {"role": "system", "content": section})
        body["messages"] = messages
        used = [{"id": h.experience.uid, "similarity": round(h.similarity, 4), "kind": h.experience.kind}
                for h in hits]
        return req.model_copy(update={"messages": [ChatMessage.model_validate(m) for m in messages]}), used
