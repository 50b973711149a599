"""The one `free_port`: a launcher (tests, benchmarks, `flywheel up`, torchrun rendezvous) asks the OS for a port.

In server/ because it is the bottom of the import graph: trainer/ (megatron's rendezvous) and
clients/ both import it.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
