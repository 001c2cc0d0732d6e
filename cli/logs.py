"""Logging for the command line: one short line per record on stderr, at the level `-v` or AICO_LOG asks for.

py-libp2p 0.8.1 sets its `libp2p` logger to WARNING, without handlers and not propagating, when it is imported, so its
records reach `logging.lastResort`, which printed them whole: its host logs a 7-line message for every stream it fails
to open, its identify service one with a traceback inside. The handler here takes lastResort's place: every record,
the library's included, is one line unless the level is DEBUG.
"""

import logging
import sys
import traceback

LOG_ENV = "AICO_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
VERBOSE_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # by the number of -v

LIBRARY_LOGGER = "libp2p"
# Library loggers that say nothing a person can act on, silenced unless the level is DEBUG. The HOP handler reads on
# after every circuit and reservation ends and logs three errors per stream; relay/circuit.py's LimitedHop logs one
# line per circuit instead. The TCP transport logs an error for every attempt of every dial; the node says once per
# dial that it failed, and why.
QUIETED_LOGGERS = ("libp2p.relay.circuit_v2.protocol", "libp2p.transport.tcp.tcp")
# Loggers that trace every address and id they decode at DEBUG (hundreds of lines a second): INFO at most.
TRACING_LOGGERS = ("multiaddr", "cid")


class LogLevelError(ValueError):
    """An AICO_LOG value that names no level."""


class OneLineFormatter(logging.Formatter):
    """`time level logger: message`, the logger by its last name; tracebacks and further lines only at DEBUG."""

    def __init__(self, *, full: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(short_name)s: %(message)s", "%H:%M:%S")
        self.full = full

    def format(self, record: logging.LogRecord) -> str:
        name = record.name.rsplit(".", 1)[-1]
        record.short_name = f"libp2p.{name}" if record.name.startswith(LIBRARY_LOGGER + ".") else name
        if self.full:
            return super().format(record)
        one_line = logging.makeLogRecord(record.__dict__)
        one_line.msg, one_line.args = first_line(record.getMessage()), None
        if record.exc_info and record.exc_info[1] is not None:
            exception = "".join(traceback.format_exception_only(record.exc_info[1])).strip().splitlines()[-1]
            one_line.msg += f" ({exception})"
        one_line.exc_info = one_line.exc_text = one_line.stack_info = None
        return super().format(one_line)


class LibraryFloor(logging.Filter):
    """Drops the library's records below `floor` (some of its loggers set themselves to INFO)."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor = floor

    def filter(self, record: logging.LogRecord) -> bool:
        library = record.name == LIBRARY_LOGGER or record.name.startswith(LIBRARY_LOGGER + ".")
        return not library or record.levelno >= self.floor


def first_line(message: str) -> str:
    """The first line of `message`, and the next one too when the first ends in a colon and announces it."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def level_from(verbosity: int, env_value: str | None) -> int:
    """The level `-v` flags ask for, else AICO_LOG's, else WARNING; LogLevelError for an unknown AICO_LOG."""
    if verbosity:
        return VERBOSE_LEVELS[min(verbosity, len(VERBOSE_LEVELS) - 1)]
    if not env_value:
        return logging.WARNING
    try:
        return LEVELS[env_value.strip().lower()]
    except KeyError:
        raise LogLevelError(f"{LOG_ENV}={env_value!r} names no level; use one of {', '.join(LEVELS)}") from None


def configure_logging(level: int) -> None:
    """Send every record at `level` or above, the library's included, to stderr as one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(OneLineFormatter(full=level <= logging.DEBUG))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.lastResort = handler  # where the library's non-propagating logger ends up
    debug = level <= logging.DEBUG
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.CRITICAL)
    if not debug:
        # A failed dial is logged by the library once per retry, then said once by the node (or the command) in what
        # it was doing: the library's own records show from -v on.
        handler.addFilter(LibraryFloor(logging.WARNING if level <= logging.INFO else logging.CRITICAL))
        return
    for name in TRACING_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # The library sets its logger to WARNING when imported: import it now, then let DEBUG through.
    import libp2p  # noqa: F401

    logging.getLogger(LIBRARY_LOGGER).setLevel(logging.DEBUG)
