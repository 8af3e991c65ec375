"""Ctrl-C and SIGTERM: a run stops cleanly and is marked KILLED.

While training, the first SIGINT/SIGTERM only requests a stop (the checkpoint
callback saves a checkpoint at the next step and ends ``learn``); a second one
quits at once without saving.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class StopRequest:
    """Set by a signal handler; the checkpoint callback acts on it at the next step."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def handling(
    handler: Callable[[int, Any], None], signums: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """Within the block, ``handler`` handles these signals; the previous handlers after it."""
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM only requests a stop; a second one quits."""
    stop = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            log.warning("second signal: quitting without a checkpoint")
            raise Interrupted(signum)
        stop.signum = signum
        log.warning(
            "%s received: saving a checkpoint and stopping (send it again to quit at once)",
            signal.Signals(signum).name,
        )

    with handling(handler):
        yield stop


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted, a KeyboardInterrupt (so a run is
    marked KILLED); ``graceful_stop`` takes over while training."""
    with handling(_interrupt, (signal.SIGTERM,)):
        yield
