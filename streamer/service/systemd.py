"""systemd's notification protocol (sd_notify): READY, STATUS, STOPPING and watchdog pings.

The protocol is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; without
that variable every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """Sends sd_notify messages when run under systemd (``Type=notify``)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        pid_matches = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval_s = int(watchdog_usec) / 1e6 / 2 if watchdog_usec.isdigit() and pid_matches else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with sock, contextlib.suppress(OSError):  # systemd went away; nothing to tell
            sock.sendto(message, self._address)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def watchdog(self) -> None:
        self.send(watchdog=1)

    def stopping(self) -> None:
        self.send(stopping=1)
