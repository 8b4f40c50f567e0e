"""A free TCP port on the loopback interface, for the gloo rendezvous of DDP test runs."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on right now (another process can still take it before we do)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
