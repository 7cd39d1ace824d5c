"""A random secret generated once into a file that only its owner may read, and read after.

Development's stand-in for a secret store: the session key (api/sessions.py) and the embedded
Postgres password (harness/embedded.py) are made this way, so they survive restarts unseen.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path


class UnusableSecret(RuntimeError):
    """The file holds something too short to be a secret."""


def persisted_secret(path: Path, *, min_length: int = 32) -> str:
    """The secret at `path`, generated first if the file does not exist.

    It is written whole to a private temporary file (0600 from its creation) and link()ed into
    place: link() fails if another process won the race, and every process then reads the winner's.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    secret = path.read_text().strip()
    if len(secret) < min_length:
        raise UnusableSecret(f"{path} holds no usable secret; delete it to have one generated")
    return secret
