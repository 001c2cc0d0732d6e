"""`aico-node import`: history from a JSON Lines file, checked whole before anything is stored, then stored in
bounded batches through the running node or the stores."""

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import orjson
import trio
import typer

from cli.common import app, console, fail, home_of, node_session, print_result, run_async
from cli.show import count
from node.api.params import (
    IMPORT_BATCH_RECORDS_MAX,
    IMPORT_KINDS,
    IMPORT_LINE_BYTES_MAX,
    ParamError,
    checked_import_record,
)

BATCH_BYTES_MAX = 1024 * 1024  # with one line of up to 2 MiB, a batch stays under the socket's 4 MiB request limit
INTERRUPTED_EXIT = 130  # as a shell reports a command ended by Ctrl-C
FORMAT_HINT = "`aico-node import --help` shows the format"


@app.command("import")
def import_history(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, metavar="FILE.jsonl", help="One JSON object per line."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a line for people.")] = False,
) -> None:
    """Import history: one JSON object per line, with a "type" of "message" (conversation, text, ts_ms, and
    optionally role, sentiment, response_time_ms, id), "memory" (text, and optionally embedding, metadata, id),
    "preference" (key, value) or "note" (name, text). Every line is checked before anything is stored; a line
    already imported is skipped, so after an interrupt the same command goes on where it stopped."""
    from rich.progress import Progress

    size = file.stat().st_size
    totals: dict[str, Any] = {"records": 0, "added": dict.fromkeys(IMPORT_KINDS, 0), "skipped": 0}
    with Progress(console=console, transient=True) as progress:
        checking = progress.add_task("checking", total=size)
        try:
            with file.open("rb") as lines:
                for number, _ in enumerate(_records(file, lines, with_ids=False)):
                    if number % IMPORT_BATCH_RECORDS_MAX == 0:
                        progress.update(checking, completed=lines.tell())
        except KeyboardInterrupt:
            raise fail("interrupted while checking the file; nothing was imported", code=INTERRUPTED_EXIT) from None
        progress.remove_task(checking)
        importing = progress.add_task("importing", total=size)

        async def store() -> None:
            # With no node running, the records this command checked go to the stores without a second check.
            async with node_session(home_of(ctx), "import.batch", "aico-node import", _import_checked) as send:

                async def send_batch(batch: list[dict[str, Any]], read_bytes: int) -> None:
                    done = await send({"records": batch})
                    totals["records"] += done["records"]
                    totals["skipped"] += done["skipped"]
                    for kind, count in done["added"].items():
                        totals["added"][kind] += count
                    progress.update(importing, completed=read_bytes)

                with file.open("rb") as lines:
                    batches = _batches(_records(file, lines))

                    def read_batch() -> tuple[list[dict[str, Any]] | None, int]:
                        return next(batches, None), lines.tell()

                    # The next batch is read while one is stored: the stores' work runs in threads without the GIL.
                    batch, read_bytes = await trio.to_thread.run_sync(read_batch)
                    while batch is not None:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(send_batch, batch, read_bytes)
                            batch, read_bytes = await trio.to_thread.run_sync(read_batch)

        try:
            run_async(store)
        except KeyboardInterrupt:
            raise fail(
                f"interrupted after {totals['records']} records; run the same command again to import the rest "
                "(what is stored is skipped)",
                code=INTERRUPTED_EXIT,
            ) from None
    print_result(totals, as_json=as_json, lines=lambda totals: [_summary(file, totals)])


async def _import_checked(node: Any, params: dict[str, Any]) -> dict[str, Any]:
    return await node.data_handlers.import_checked(params["records"])


def _records(path: Path, lines: BinaryIO, *, with_ids: bool = True) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield each line's record, checked (with its id if `with_ids`), and about its size in a request; a bad line ends
    the command with its number and what is wrong."""
    number = 0
    while raw := lines.readline(IMPORT_LINE_BYTES_MAX + 1):
        number += 1
        if len(raw) > IMPORT_LINE_BYTES_MAX:
            raise _bad_line(path, number, f"longer than {IMPORT_LINE_BYTES_MAX // (1024 * 1024)} MiB")
        if not raw.strip():
            continue
        try:
            record = checked_import_record(orjson.loads(raw), with_id=with_ids)
        except ValueError as error:  # malformed JSON or UTF-8
            raise _bad_line(path, number, f"not JSON ({error})") from None
        except ParamError as error:
            raise _bad_line(path, number, str(error)) from None
        # Its size as the socket sends it (msgpack): the text as in the line, every number of an embedding 9 bytes.
        yield record, len(raw) + 9 * len(record.get("embedding") or ())


def _bad_line(path: Path, number: int, why: str) -> typer.Exit:
    return fail(f"{path}, line {number}: {why}; {FORMAT_HINT}", code=2)


def _batches(records: Iterator[tuple[dict[str, Any], int]]) -> Iterator[list[dict[str, Any]]]:
    """Group records into batches of at most IMPORT_BATCH_RECORDS_MAX records and about BATCH_BYTES_MAX bytes of lines."""
    batch: list[dict[str, Any]] = []
    batch_bytes = 0
    for record, size in records:
        if batch and (len(batch) == IMPORT_BATCH_RECORDS_MAX or batch_bytes + size > BATCH_BYTES_MAX):
            yield batch
            batch, batch_bytes = [], 0
        batch.append(record)
        batch_bytes += size
    if batch:
        yield batch


def _summary(path: Path, totals: dict[str, Any]) -> str:
    plurals = {"memory": "memories"}
    added = ", ".join(count(number, kind, plurals.get(kind)) for kind, number in totals["added"].items() if number)
    skipped = f"; {totals['skipped']:,} already here, skipped" if totals["skipped"] else ""
    return f"imported {path}: {count(totals['records'], 'record')}, {added or 'nothing new'} added{skipped}"
