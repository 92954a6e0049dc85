"""Running the application on uvicorn: bound to 127.0.0.1 unless told otherwise; SIGTERM (and Ctrl-C) stops
accepting connections, lets in-flight requests finish (up to ``drain_timeout_s``), closes the models, and
returns, so ``planforge serve`` exits 0. (uvicorn re-raises a caught signal after its shutdown, which would end
the process with the signal's status; a service manager sending SIGTERM expects 0 from a clean stop.)"""

from __future__ import annotations

import logging
import signal
import socket

import uvicorn

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
            self._captured_signals.remove(sig)  # a clean stop: exit 0 rather than die of the signal afterwards


def run(app, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 120.0,
        sock: socket.socket | None = None, log_level: str = "warning") -> None:
    """Serve ``app`` until SIGTERM or Ctrl-C (module docstring)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s, access_log=False)
    server = _Server(config)
    server.run(sockets=[sock] if sock is not None else None)
