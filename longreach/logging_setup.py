"""One stderr handler on the `longreach` logger, at the level the user asked for, that never prints a secret.

Library code only calls `logging.getLogger(__name__)` (every module sits under `longreach`); a command-line
verb that wants its records seen calls `configure_logging(level, secrets=...)` once. Without it Python's
last-resort handler shows warnings only, so `logger.info` records (the server's startup summary, the
planner's notes) would be lost.

    configure_logging("info", secrets=[api_key])   # "longreach.serve INFO  ..." lines on stderr

Records keep propagating to the root logger, so pytest's `caplog` and an application's own handlers still
see them. Every secret given is replaced by `***` in each formatted line this handler writes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

LEVELS = ("critical", "error", "warning", "info", "debug")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_HANDLER_NAME = "longreach-stderr"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives (as logging's last-resort handler does), so a
    replaced stderr (pytest's capture, a redirect) is followed and a closed one never kept."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr


class RedactingFormatter(logging.Formatter):
    """A formatter that writes `***` wherever one of `secrets` would appear (message, arguments, traceback)."""

    def __init__(self, fmt: str = FORMAT, secrets: Iterable[str] = ()):
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if s)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(level: str | int = "info", secrets: Iterable[str | None] = ()) -> logging.Handler:
    """Attach (or replace) the stderr handler of the `longreach` logger and set both to `level`.

    level: one of LEVELS (any case) or a logging constant. secrets: strings never to print (None skipped).
    Calling it again replaces the handler, so it is safe in tests and repeated CLI runs."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
        level = getattr(logging, level.upper())
    logger = logging.getLogger("longreach")
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(RedactingFormatter(FORMAT, [s for s in secrets if s]))
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
