"""Commands that read and write the node's data, through the running node or the stores directly."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    analytics_app,
    app,
    call,
    devices_app,
    embedding_file,
    fail,
    home_of,
    json_value,
    memory_app,
    msg_app,
    note_app,
    out,
    pref_app,
    print_json,
)


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show this device, its stores and its peers."""
    result = call(home_of(ctx), "status")
    if as_json:
        print_json(result)
    else:
        for key, value in result.items():
            out.print(f"{key}: {value}")


@app.command()
def digest(ctx: typer.Context) -> None:
    """Print the sha256 and counts of the synced state (equal on two devices exactly when they agree)."""
    print_json(call(home_of(ctx), "digest"))


@app.command()
def conflicts(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100) -> None:
    """List concurrent values that lost a last-writer-wins merge, newest first."""
    rows = call(home_of(ctx), "conflicts", limit=limit)
    table = Table("collection", "key", "field", "kept", "lost", "lost from")
    for row in rows:
        table.add_row(row["collection"], row["key"], str(row["field"] or ""), repr(row["winner_value"]),
                      repr(row["loser_value"]), f"{row['loser_device'][:16]}:{row['loser_seq']}")  # fmt: skip
    out.print(table if rows else "no conflicts")


@app.command()
def rebuild(ctx: typer.Context) -> None:
    """Regenerate every derived store (DuckDB, Chroma, cache) from the primary store."""
    print_json(call(home_of(ctx), "rebuild"))


@app.command()
def forget(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="message or memory")],
    item_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Delete a message or memory from every store and every device."""
    if kind not in ("message", "memory"):
        raise typer.BadParameter("kind must be message or memory")
    print_json(call(home_of(ctx), "forget", kind=kind, id=item_id))


@pref_app.command("set")
def pref_set(ctx: typer.Context, key: str, value: str) -> None:
    """Set a preference (VALUE is parsed as JSON when it is JSON)."""
    print_json(call(home_of(ctx), "pref.set", key=key, value=json_value(value)))


@pref_app.command("get")
def pref_get(ctx: typer.Context, key: str) -> None:
    """Print a preference as JSON (null when unset)."""
    print_json(call(home_of(ctx), "pref.get", key=key))


@msg_app.command("add")
def msg_add(
    ctx: typer.Context,
    conversation: str,
    text: str,
    role: Annotated[str, typer.Option()] = "user",
    sentiment: Annotated[float | None, typer.Option(min=-1.0, max=1.0)] = None,
    response_time_ms: Annotated[float | None, typer.Option(min=0)] = None,
) -> None:
    """Add a message to a conversation and print its id."""
    print_json(call(home_of(ctx), "msg.add", conversation=conversation, text=text, role=role,
                     sentiment=sentiment, response_time_ms=response_time_ms))  # fmt: skip


@memory_app.command("add")
def memory_add(
    ctx: typer.Context,
    text: str,
    embedding: Annotated[Path | None, typer.Option(help="A .npy file with the memory's embedding.")] = None,
    metadata: Annotated[str | None, typer.Option(help="Metadata as a JSON object.")] = None,
) -> None:
    """Store a memory and print its id."""
    meta = json_value(metadata) if metadata else {}
    if not isinstance(meta, dict):
        raise typer.BadParameter("metadata must be a JSON object")
    print_json(call(home_of(ctx), "memory.add", text=text, embedding=embedding_file(embedding), metadata=meta))


@memory_app.command("search")
def memory_search(
    ctx: typer.Context,
    text: Annotated[str | None, typer.Argument()] = None,
    embedding: Annotated[Path | None, typer.Option(help="A .npy file with the query embedding.")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 5,
    where: Annotated[str | None, typer.Option(help="Metadata filter as a JSON object.")] = None,
) -> None:
    """Print the memories nearest a text or an embedding, one per near-duplicate group."""
    if (text is None) == (embedding is None):
        raise typer.BadParameter("give either TEXT or --embedding")
    print_json(call(home_of(ctx), "memory.search", text=text, embedding=embedding_file(embedding), k=k,
                     where=json_value(where) if where else None))  # fmt: skip


@note_app.command("edit")
def note_edit(ctx: typer.Context, name: str, text: str) -> None:
    """Set a note's text (merged character-wise with edits made elsewhere)."""
    print_json(call(home_of(ctx), "note.edit", name=name, text=text))


@note_app.command("show")
def note_show(ctx: typer.Context, name: str) -> None:
    """Print a note's text."""
    text = call(home_of(ctx), "note.show", name=name)
    if text is None:
        raise fail(f"no note named {name}")
    print(text)


@analytics_app.command("daily")
def analytics_daily(ctx: typer.Context, days: Annotated[int, typer.Option(min=1, max=3660)] = 30) -> None:
    """Per day: message count, average sentiment, p95 response time (newest first)."""
    print_json(call(home_of(ctx), "analytics.daily", days=days))


@devices_app.callback()
def devices(ctx: typer.Context) -> None:
    """List this user's devices."""
    if ctx.invoked_subcommand is None:
        print_json(call(home_of(ctx), "devices.list"))


@devices_app.command("revoke")
def devices_revoke(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="The device id to cut off for good.")],
    reason: Annotated[str, typer.Option(help="Why, kept in the registry.")] = "",
) -> None:
    """Revoke a device for good and rotate the group key so it reads nothing written from now on."""
    print_json(call(home_of(ctx), "devices.revoke", device=device, reason=reason))
