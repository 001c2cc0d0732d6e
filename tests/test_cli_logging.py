"""The command line's logging: one line per record on stderr at the level -v or AICO_LOG asks for, py-libp2p's
records included (they reach logging.lastResort), its noise kept out unless -vv."""

import logging

import libp2p  # noqa: F401  (its import leaves its logger at WARNING, without handlers, not propagating)
import pytest

from cli.logs import LIBRARY_LOGGER, QUIETED_LOGGERS, TRACING_LOGGERS, LogLevelError, configure_logging, level_from

HOP_LOGGER = "libp2p.relay.circuit_v2.protocol"


@pytest.fixture(autouse=True)
def logging_restored():
    root = logging.getLogger()
    names = (LIBRARY_LOGGER, *QUIETED_LOGGERS, *TRACING_LOGGERS)
    saved = root.handlers[:], root.level, logging.lastResort, {name: logging.getLogger(name).level for name in names}
    yield
    root.handlers[:], level, logging.lastResort, levels = saved
    root.setLevel(level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def configure_as_in_a_process(level: int) -> None:
    """configure_logging, then the library's logger as a process has it: pytest hangs its capture handlers on
    non-propagating loggers while a test runs, and there they would take the records lastResort takes."""
    configure_logging(level)
    logging.getLogger(LIBRARY_LOGGER).handlers.clear()


def _failed_stream() -> None:
    """What py-libp2p's host logs when a stream cannot be opened: several lines and the exception's traceback."""
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("libp2p.host.basic_host").exception(
            "Failed to open stream to peer X:\n  Error: protocol read failed\n  Timeout: 30s"
        )


def test_a_library_record_with_a_traceback_is_one_line(capsys):
    configure_as_in_a_process(level_from(1, None))
    _failed_stream()
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "ERROR libp2p.basic_host: Failed to open stream to peer X: Error: protocol read failed (ValueError: boom)" in err


def test_at_the_default_level_the_library_says_nothing_the_node_says_itself(capsys):
    configure_as_in_a_process(logging.WARNING)
    _failed_stream()  # a failed dial: the library logs each retry, the node then says what failed, once
    logging.getLogger("node.net.dial").info("not shown at the default level")
    logging.getLogger("node.net.sessions").warning("shown")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WARNING sessions: shown" in err, err


def test_verbose_shows_info_but_not_the_librarys_own_info_nor_the_hop_handlers_errors(capsys):
    configure_as_in_a_process(level_from(1, None))
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.INFO)  # as the library does at import
    logging.getLogger("libp2p.network.auto_connector").info("AUTO_CONNECTOR_STATE: num_connections=0")
    logging.getLogger(HOP_LOGGER).error("Error reading from hop stream from X: ")
    logging.getLogger("node.net.dial").info("sync with X: cannot dial")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "INFO dial: sync with X: cannot dial" in err, err


def test_debug_shows_everything_with_tracebacks(capsys):
    configure_as_in_a_process(level_from(2, None))
    _failed_stream()
    logging.getLogger(HOP_LOGGER).error("Error reading from hop stream from X: ")
    logging.getLogger("libp2p.network.swarm").debug("dialling")
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "Timeout: 30s" in err
    assert "Error reading from hop stream" in err and "DEBUG libp2p.swarm: dialling" in err


def test_levels_from_flags_and_the_environment():
    assert level_from(0, None) == logging.WARNING
    assert level_from(1, "error") == logging.INFO  # the flag wins
    assert level_from(5, None) == logging.DEBUG
    assert level_from(0, "Debug") == logging.DEBUG and level_from(0, "error") == logging.ERROR
    with pytest.raises(LogLevelError, match="AICO_LOG='loud' names no level"):
        level_from(0, "loud")
