"""The command line's contract: user errors are one line and exit 1, bugs keep their
traceback, Ctrl-C and SIGTERM exit 128 + signal, a failing sweep job lets the others run.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
EXIT_ERROR = 1
# Errors whose message tells the user what to fix (a value, a file, a checkpoint,
# the store), printed as one paragraph instead of a traceback: (module, class).
USER_ERRORS = (
    ("pvbess.config", "ConfigError"),
    ("pvbess.errors", "DataError"),
    ("pvbess.experiment.checkpoints", "CheckpointError"),
    ("pvbess.experiment.tracking", "TrackingError"),
)


def user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one of USER_ERRORS (checked in the modules imported so far:
    an error class whose module was never imported cannot have been raised)."""
    classes = tuple(
        getattr(sys.modules[module], cls) for module, cls in USER_ERRORS if module in sys.modules
    )
    return isinstance(exc, classes)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run(job: Callable[[], T]) -> T:
    """Call ``job`` under the contract above (inside a ``@hydra.main``)."""
    try:
        return job()
    except KeyboardInterrupt as exc:
        log.error("interrupted (%s)", exc or "Ctrl-C")
        # SystemExit passes through Hydra's handler; 128 + signal number, as a shell reports it.
        raise SystemExit(128 + getattr(exc, "signum", signal.SIGINT)) from None
    except Exception as exc:
        if not user_error(exc):
            raise  # a bug: Hydra prints the traceback
        log.error("error: %s: %s", type(exc).__name__, exc)
        if in_multirun():
            raise  # Hydra marks this job FAILED and goes on with the sweep's other jobs
        raise SystemExit(EXIT_ERROR) from None


def ignored_overrides(keep: tuple[str, ...] = ("resume", "tracking.uri")) -> list[str]:
    """Command-line overrides that a resumed run does not apply (it keeps its config)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides.task
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keep]
