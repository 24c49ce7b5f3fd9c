"""The garbage collector's policy for a latency-bound server.

CPython's cyclic collector stops the event loop while it runs. With the default thresholds
(700, 10, 10) a busy proxy runs a young collection every few requests and, now and then, a full
collection that walks every object in the heap: the imported libraries, the app, and (with
memory on) the embedder, hundreds of thousands of objects, tens of milliseconds each time.
Those pauses were the proxy's p99 (README, "Measured").

After start-up, ``settle`` collects once and freezes what survives (``gc.freeze``): the
long-lived start-up heap moves to a permanent generation that later collections skip. Raised
thresholds then make young collections rarer; a request's garbage is almost all freed by
reference counting, so fewer passes find the same few cycles.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle(*, freeze: bool, thresholds: tuple[int, int, int]) -> None:
    """Collects and freezes the surviving heap (when ``freeze``), and sets the thresholds.

    Call once the app has started; calling it again after a large lazy load moves that out of
    the way too.
    """
    if freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*thresholds)
    log.info("gc: %d start-up objects frozen; thresholds %s", gc.get_freeze_count(), gc.get_threshold())


def release() -> None:
    """Unfreezes the heap at shutdown, so an app that stops (in tests, many per process) leaves its
    cyclic garbage collectable."""
    gc.unfreeze()
