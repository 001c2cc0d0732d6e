"""Every user mistake, made as a real `aico-node` process: a short error naming the problem, exit code 2 for usage
errors and 1 for refused operations, no traceback, and nothing changed in the home."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.processes import cli, env

USAGE, REFUSED = 2, 1
LINES_MAX = 4
PEER_ID = "12D3KooWHEResUoHeNzTrV6Cy9yA7gLa8KoCamr1FqQpA8Zf8Wfr"

# (arguments, extra environment, exit code, what the error must say); {files} is a folder of prepared files.
CASES = [
    (["run", "--listen", "garbage"], {}, USAGE, "'garbage' is not a multiaddr"),
    (["run", "--listen", "/ip4/127.0.0.1/udp/4001"], {}, USAGE, "not a TCP address"),
    (["run", "--peer", "garbage"], {}, USAGE, "'garbage' is not a multiaddr"),
    (["run", "--peer", "/ip4/1.2.3.4/tcp/1"], {}, USAGE, "does not end in /p2p/<peer id>"),
    (["run", "--peer", "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWnotanid"], {}, USAGE, "peer id after /p2p/ is not valid"),
    (["run", "--relay", "/ip4/1.2.3.4/tcp/4001"], {}, USAGE, "/p2p/<relay id>"),
    (["run", "--relay", f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_ID}/p2p-circuit/p2p/{PEER_ID}"], {}, USAGE, "relay's address"),
    (["run", "--gui", "0.0.0.0:80"], {}, USAGE, "loopback"),
    (["run", "--listen", "/ip4/192.0.2.1/tcp/4001", "--no-gui"], {}, REFUSED, "cannot listen on /ip4/192.0.2.1/tcp/4001"),
    (["memory", "search", "--where", "nope", "tea"], {}, USAGE, "--where is not JSON"),
    (["memory", "search", "--where", '{"topic": ["tea"]}', "tea"], {}, USAGE, "--where 'topic' must be a string"),
    (["memory", "search"], {}, USAGE, "give either TEXT or --embedding"),
    (["memory", "add", "--metadata", "[1]", "x"], {}, USAGE, "--metadata must be a JSON object"),
    (["memory", "add", "--metadata", '{"note": "' + "x" * 100 + '"}', "x"], {}, USAGE, "--metadata 'note' has 100"),
    (["memory", "add", "--embedding", "{files}/missing.npy", "x"], {}, USAGE, "does not exist"),
    (["memory", "add", "--embedding", "{files}/short.npy", "x"], {}, USAGE, "one row of 384 numbers"),
    (["memory", "add", "--embedding", "{files}/text.npy", "x"], {}, USAGE, "is not a .npy file"),
    (["msg", "add", "", "hello"], {}, USAGE, "the conversation must be a non-empty string"),
    (["msg", "add", "chat", ""], {}, USAGE, "the message must be a non-empty string"),
    (["msg", "list"], {}, USAGE, "Missing argument 'CONVERSATION'"),
    (["msg", "list", "chat", "--limit", "0"], {}, USAGE, "--limit"),
    (["pref", "set", "k" * 300, "1"], {}, USAGE, "at most 256"),
    (["pref", "set", "two\nlines", "1"], {}, USAGE, "control character"),
    (["forget", "thing", "1"], {}, USAGE, "can forget a message or a memory"),
    (["forget", "message", "no-such-id"], {}, REFUSED, "no message with id no-such-id"),
    (["note", "show", "no-such-note"], {}, REFUSED, "no note named no-such-note"),
    (["analytics", "daily", "--days", "0"], {}, USAGE, "--days"),
    (["init", "--engine", "nosuch"], {}, USAGE, "no SQL engine is named 'nosuch'"),
    (["init"], {}, REFUSED, "already"),
    (["pref", "get", "theme"], {"AICO_PASSPHRASE": "wrong passphrase"}, REFUSED, "wrong passphrase"),
    (["status"], {"AICO_LOG": "loud"}, USAGE, "AICO_LOG='loud' names no level"),
    (["frobnicate"], {}, USAGE, "No such command 'frobnicate'"),
    (["status", "--verbose-please"], {}, USAGE, "No such option"),
    (["pair", "invite"], {}, REFUSED, "start it with `aico-node run`"),
    (["gui"], {}, REFUSED, "start it with `aico-node run`"),
]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("errors") / "home"
    done = cli(home, "init")
    assert done.returncode == 0, done.stderr
    return home


@pytest.fixture(scope="module")
def digest(home) -> str:
    return _digest(home)


def _digest(home: Path) -> str:
    done = cli(home, "digest")
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    np.save(folder / "short.npy", np.ones(3))
    (folder / "text.npy").write_text("not an array")
    return folder


def _snapshot(home: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("args", "extra_env", "code", "says"), CASES, ids=[" ".join(case[0])[:60] for case in CASES])
def test_a_mistake_gets_a_short_error_its_exit_code_and_changes_nothing(
    home, digest, files, args, extra_env, code, says
):
    before = _snapshot(home)
    done = cli(home, *(arg.replace("{files}", str(files)) for arg in args), extra_env=extra_env, timeout_s=60)
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert done.returncode == code, output
    assert says in output, output
    assert "Traceback" not in output and len(lines) <= LINES_MAX, output
    assert lines[0].startswith("error: "), output
    if code == USAGE:
        assert _snapshot(home) == before  # refused before any store was opened
    else:
        assert _digest(home) == digest  # the stores were opened, maybe, but hold the same state


def test_a_home_that_does_not_exist_says_how_to_make_one(tmp_path):
    done = cli(tmp_path / "nowhere", "digest")
    assert done.returncode == REFUSED and done.stderr.strip() == (
        f"error: {tmp_path / 'nowhere'} is not initialised; run `aico-node --home {tmp_path / 'nowhere'} init`"
    )


_FAILING_COMMAND = """
import sys
import cli.data
def broken(*args, **kwargs):
    raise RuntimeError("injected")
cli.data.show.status_lines = broken
sys.argv[0] = "aico-node"
cli.main()
"""


def test_an_unexpected_error_is_one_line_naming_it_and_debug_shows_the_traceback(home):
    # A fault injected into the command's rendering stands for any bug: the process says what and where to look.
    command = [sys.executable, "-c", _FAILING_COMMAND, "--home", str(home)]
    done = subprocess.run([*command, "status"], capture_output=True, text=True, env=env(), timeout=60)
    assert done.returncode == REFUSED
    assert done.stderr.strip() == "error: internal error: RuntimeError: injected (run with --debug for the traceback)"
    debugged = subprocess.run([*command, "--debug", "status"], capture_output=True, text=True, env=env(), timeout=60)
    assert debugged.returncode == REFUSED
    assert "Traceback (most recent call last)" in debugged.stderr and "RuntimeError: injected" in debugged.stderr


def _commands(command, path=()):
    """Every command of the click tree under `command`, with its path."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_option_has_help_and_no_help_shows_python_types(capsys):
    import typer

    from cli import app, run

    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert param.help, f"{' '.join(path)} {param.opts} has no help"
        assert run([*path, "--help"]) == 0
        shown = capsys.readouterr().out
        for python_type in ("<bool>", "<list[str]>", "<float", "<int", "<path>", "<str>"):
            assert python_type not in shown, (path, shown)
        usage = shown.splitlines()[0]
        assert "{" not in usage, usage  # a required argument is `CODE`, as click writes it
