"""Commands that read and write the node's data, through the running node or the stores directly.

Every command that prints data takes `--json`. `status`, `conflicts` and the `list` commands print for people unless
given it; the others have always printed JSON, which scripts rely on, and keep printing it.
"""

import functools
from pathlib import Path
from typing import Annotated

import typer

import cli.checks as checks
import cli.show as show
from cli.common import (
    analytics_app,
    app,
    call,
    call_where,
    devices_app,
    fail,
    home_of,
    json_value,
    memory_app,
    msg_app,
    note_app,
    pref_app,
    print_json,
    print_result,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of lines for people.")]
JsonAlwaysOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (this command always does; the flag is for scripts that ask).")
]
LimitOption = Annotated[int, typer.Option(metavar="N", min=1, max=10_000, help="Show at most this many, newest first.")]
EmbeddingOption = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, metavar="FILE.npy", help="A .npy file holding one embedding row."),
]


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Show this device, its addresses, the group's devices (online, path, last sync, lag), the relay and the stores."""
    result, running = call_where(home_of(ctx), "status")
    print_result(result, as_json=as_json, lines=functools.partial(show.status_lines, running=running))


@app.command()
def digest(ctx: typer.Context, as_json: JsonAlwaysOption = False) -> None:
    """Print the sha256 and counts of the synced state (equal on two devices exactly when they agree)."""
    print_json(call(home_of(ctx), "digest"))


@app.command()
def conflicts(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(metavar="N", min=1, max=100_000, help="Show at most this many, newest first.")] = 100,
    as_json: JsonOption = False,
) -> None:
    """List concurrent values that lost a last-writer-wins merge, newest first."""
    print_result(call(home_of(ctx), "conflicts", limit=limit), as_json=as_json, lines=show.conflict_lines)


@app.command()
def rebuild(ctx: typer.Context, as_json: JsonAlwaysOption = False) -> None:
    """Regenerate every derived store (DuckDB, Chroma, cache) from the primary store."""
    print_json(call(home_of(ctx), "rebuild"))


@app.command()
def forget(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(metavar="message|memory", help="What to forget: message or memory.")],
    item_id: Annotated[str, typer.Argument(metavar="ID", help="Its id, as `msg list` or `memory list` show it.")],
    as_json: JsonAlwaysOption = False,
) -> None:
    """Delete a message or memory from every store and every device."""
    if kind not in ("message", "memory"):
        raise typer.BadParameter(f"can forget a message or a memory, not {kind!r}")
    print_json(call(home_of(ctx), "forget", kind=kind, id=checks.name(item_id, "the id")))


@pref_app.command("set")
def pref_set(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="The preference's name, e.g. theme.")],
    value: Annotated[
        str, typer.Argument(metavar="VALUE", help='Its value: JSON when it is JSON (7, true, "dark"), else text.')
    ],
    as_json: JsonAlwaysOption = False,
) -> None:
    """Set a preference (VALUE is parsed as JSON when it is JSON)."""
    print_json(call(home_of(ctx), "pref.set", key=checks.name(key, "the key"), value=json_value(value)))


@pref_app.command("get")
def pref_get(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="The preference's name.")],
    as_json: JsonAlwaysOption = False,
) -> None:
    """Print a preference as JSON (null when unset)."""
    print_json(call(home_of(ctx), "pref.get", key=checks.name(key, "the key")))


@pref_app.command("list")
def pref_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List every preference and its value."""
    print_result(call(home_of(ctx), "pref.list"), as_json=as_json, lines=show.preference_lines)


@msg_app.command("add")
def msg_add(
    ctx: typer.Context,
    conversation: Annotated[str, typer.Argument(metavar="CONVERSATION", help="The conversation's name.")],
    text: Annotated[str, typer.Argument(metavar="TEXT", help="The message.")],
    role: Annotated[str, typer.Option(metavar="ROLE", help="Who said it: user, assistant, ...")] = "user",
    sentiment: Annotated[float | None, typer.Option(metavar="NUMBER", min=-1.0, max=1.0, help="Sentiment from -1 to 1.")] = None,
    response_time_ms: Annotated[
        float | None, typer.Option(metavar="MS", min=0, help="How long the answer took, in milliseconds.")
    ] = None,
    as_json: JsonAlwaysOption = False,
) -> None:
    """Add a message to a conversation and print its id."""
    print_json(call(home_of(ctx), "msg.add", conversation=checks.name(conversation, "the conversation"),
                     text=checks.text(text, "the message"), role=checks.name(role, "--role"), sentiment=sentiment,
                     response_time_ms=response_time_ms))  # fmt: skip


@msg_app.command("list")
def msg_list(
    ctx: typer.Context,
    conversation: Annotated[str, typer.Argument(metavar="CONVERSATION", help="The conversation's name.")],
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List a conversation's messages, newest first."""
    messages = call(home_of(ctx), "msg.list", conversation=checks.name(conversation, "the conversation"), limit=limit)
    print_result(messages, as_json=as_json, lines=show.message_lines)


@memory_app.command("add")
def memory_add(
    ctx: typer.Context,
    text: Annotated[str, typer.Argument(metavar="TEXT", help="The memory.")],
    embedding: EmbeddingOption = None,
    metadata: Annotated[
        str | None, typer.Option(metavar="JSON", help='Short tags as a JSON object, e.g. \'{"topic": "tea"}\'.')
    ] = None,
    as_json: JsonAlwaysOption = False,
) -> None:
    """Store a memory and print its id (embedded from its text unless --embedding is given)."""
    home = home_of(ctx)
    print_json(call(home, "memory.add", text=checks.text(text, "the memory"),
                    embedding=checks.embedding_file(embedding, home) if embedding else None,
                    metadata=checks.metadata_json(metadata, "--metadata") if metadata else {}))  # fmt: skip


@memory_app.command("search")
def memory_search(
    ctx: typer.Context,
    text: Annotated[
        str | None, typer.Argument(metavar="TEXT", help="What to look for (or give --embedding).")
    ] = None,
    embedding: EmbeddingOption = None,
    k: Annotated[int, typer.Option("-k", metavar="N", min=1, max=1000, help="How many memories to return.")] = 5,
    where: Annotated[
        str | None, typer.Option(metavar="JSON", help='Only memories with these tags, e.g. \'{"topic": "tea"}\'.')
    ] = None,
    as_json: JsonAlwaysOption = False,
) -> None:
    """Print the memories nearest a text or an embedding, one per near-duplicate group."""
    if (text is None) == (embedding is None):
        raise typer.BadParameter("give either TEXT or --embedding")
    home = home_of(ctx)
    print_json(call(home, "memory.search", text=checks.text(text, "the search text") if text is not None else None,
                    embedding=checks.embedding_file(embedding, home) if embedding else None, k=k,
                    where=checks.metadata_json(where, "--where") if where else None))  # fmt: skip


@memory_app.command("list")
def memory_list(ctx: typer.Context, limit: LimitOption = 50, as_json: JsonOption = False) -> None:
    """List memories, newest first, with their ids and tags."""
    print_result(call(home_of(ctx), "memory.list", limit=limit), as_json=as_json, lines=show.memory_lines)


@note_app.command("edit")
def note_edit(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The note's name.")],
    text: Annotated[str, typer.Argument(metavar="TEXT", help="Its whole new text.")],
    as_json: JsonAlwaysOption = False,
) -> None:
    """Set a note's text (merged character-wise with edits made elsewhere)."""
    print_json(call(home_of(ctx), "note.edit", name=checks.name(name, "the note's name"),
                    text=checks.text(text, "the note", empty_ok=True)))  # fmt: skip


@note_app.command("show")
def note_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The note's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the text as a JSON string.")] = False,
) -> None:
    """Print a note's text."""
    text = call(home_of(ctx), "note.show", name=checks.name(name, "the note's name"))
    if text is None:
        raise fail(f"no note named {name}; `aico-node note list` lists them")
    print_result(text, as_json=as_json, lines=lambda text: [text])


@note_app.command("list")
def note_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the names of the notes."""
    print_result(call(home_of(ctx), "note.list"), as_json=as_json, lines=lambda names: names or ["no notes"])


@analytics_app.command("daily")
def analytics_daily(
    ctx: typer.Context,
    days: Annotated[int, typer.Option(metavar="N", min=1, max=3660, help="How many days back.")] = 30,
    as_json: JsonAlwaysOption = False,
) -> None:
    """Per day: message count, average sentiment, p95 response time (newest first)."""
    print_json(call(home_of(ctx), "analytics.daily", days=days))


@devices_app.callback()
def devices(ctx: typer.Context, as_json: JsonAlwaysOption = False) -> None:
    """List this user's devices."""
    if ctx.invoked_subcommand is None:
        print_json(call(home_of(ctx), "devices.list"))


@devices_app.command("revoke")
def devices_revoke(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(metavar="DEVICE", help="The device id to cut off for good.")],
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why, kept in the registry.")] = "",
    as_json: JsonAlwaysOption = False,
) -> None:
    """Revoke a device for good and rotate the group key so it reads nothing written from now on."""
    print_json(call(home_of(ctx), "devices.revoke", device=checks.name(device, "the device id"), reason=reason))
