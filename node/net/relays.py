"""The relays a node may use, in order, and the one it uses now: a relay that cannot be reached gives way to the next.

Several relays are meant to be a fleet serving one mailbox store (docs/spec/relay.md, section 4), so a device that
moves to another relay still finds what it and the others posted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


class RelayChoice:
    """Which of the configured relays is in use; `failed` moves on to the next, round robin."""

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ValueError("a RelayChoice needs at least one relay address")
        self.addresses = list(dict.fromkeys(addresses))
        self._index = 0

    @property
    def current(self) -> str:
        """The relay in use."""
        return self.addresses[self._index]

    def failed(self, address: str) -> None:
        """`address` could not be reached: use the next relay, if there is another and `address` is the one in use."""
        if len(self.addresses) > 1 and address == self.current:
            self._index = (self._index + 1) % len(self.addresses)
            log.warning("relay %s cannot be reached: using %s", address, self.current)
