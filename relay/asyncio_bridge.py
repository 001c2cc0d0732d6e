"""An asyncio event loop on its own thread, for asyncio-only clients (nats-py) inside the trio relay.

Trio tasks hand it coroutines and wait on a trio Event that the loop's thread sets when the coroutine is done, so no
trio thread is ever blocked. At most `calls_max` calls are in the loop at once (later callers wait their turn in trio)
and every call has a deadline on both sides: the coroutine is cancelled in asyncio when the trio caller gives up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")
STOP_TIMEOUT_S = 10.0


class BridgeClosed(RuntimeError):
    """The bridge's loop is stopped; no more calls."""


class AsyncioBridge:
    """Runs coroutines on a private asyncio loop for trio callers, under a bound on calls in flight."""

    def __init__(self, calls_max: int, name: str = "asyncio-bridge") -> None:
        self._slots = trio.CapacityLimiter(calls_max)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=name, daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            # Stopped: cancel what is left so every coroutine sees its cancellation before the loop closes.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def call(self, function: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """Await `function()` on the loop and return its result; raise trio.TooSlowError after `timeout_s`
        (waiting for a free slot included), or what the coroutine raised."""
        if self._loop.is_closed() or not self._thread.is_alive():
            raise BridgeClosed("the asyncio loop has stopped")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the trio caller is gone with its run

        async def bounded() -> T:
            return await asyncio.wait_for(function(), timeout_s)

        with trio.fail_after(timeout_s):
            async with self._slots:
                future = asyncio.run_coroutine_threadsafe(bounded(), self._loop)
                future.add_done_callback(wake)
                try:
                    await done.wait()
                except BaseException:
                    future.cancel()  # cancels the coroutine in the loop, which never acknowledges to anyone
                    raise
        return future.result()

    async def aclose(self) -> None:
        """Stop the loop (cancelling what still runs in it) and wait for its thread; idempotent."""
        if not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass  # closed meanwhile
        with trio.move_on_after(STOP_TIMEOUT_S, shield=True):
            await trio.to_thread.run_sync(self._thread.join, STOP_TIMEOUT_S, abandon_on_cancel=True)
