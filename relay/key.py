"""The relay's persistent Ed25519 key seed, kept in its data folder so its peer id survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

from relay.errors import RelayError

KEY_FILE = "relay.key"
SEED_BYTES = 32


def load_or_create_seed(directory: Path) -> bytes:
    """The relay's 32-byte key seed from `directory`, created (owner-only) on first use, so its peer id is stable."""
    path = Path(directory) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        seed = path.read_bytes()
        if len(seed) != SEED_BYTES:
            raise RelayError(f"{path} is not a {SEED_BYTES}-byte relay key") from None
        return seed
    seed = os.urandom(SEED_BYTES)
    with os.fdopen(fd, "wb") as file:
        file.write(seed)
        file.flush()
        os.fsync(file.fileno())
    return seed
