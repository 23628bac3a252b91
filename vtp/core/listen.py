"""A listening TCP socket for a vtp server, or a message that says what to change."""

from __future__ import annotations

import socket


def listening_socket(host: str, port: int, *, port_setting: str, backlog: int) -> socket.socket:
    """Bound to ``host:port`` and listening; OSError with the fix in its message when the
    address is taken or not ours."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {host}:{port} ({exc.strerror}): stop what listens there, or "
            f"set {port_setting} (0 picks a free port)",
        ) from None
    sock.listen(backlog)
    return sock
