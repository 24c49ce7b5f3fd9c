"""protocol/events.py: the bus never blocks a publisher; a slow subscriber loses its oldest."""

from __future__ import annotations

from protocol.events import EventBus, RequestEvent


def _event(i: int) -> RequestEvent:
    return RequestEvent(request_id=str(i), tenant="t", model="m", strategy="s", messages=[], answer=None,
                        uncertainty=None, usage={})


def test_a_full_queue_drops_its_oldest_and_counts_it() -> None:
    bus = EventBus(maxsize=2)
    assert not bus.active
    q = bus.subscribe()
    assert bus.active
    for i in range(3):
        bus.publish(_event(i))
    assert bus.dropped == 1
    assert [q.get_nowait().request_id for _ in range(2)] == ["1", "2"]
    bus.unsubscribe(q)
    bus.publish(_event(4))
    assert q.empty() and not bus.active
