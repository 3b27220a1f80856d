"""The tests' IMAP servers: Dovecot (bench/dovecot.py), and a proxy that drops
connections mid-answer."""
from __future__ import annotations

import socket
import threading

from bench.dovecot import Dovecot, available

__all__ = ["Dovecot", "available", "CuttingProxy"]


class CuttingProxy:
    """A TCP proxy to ``port`` on loopback that drops each connection once the server has
    sent ``cut_after`` bytes through it (None: never), as a network that fails mid-FETCH."""

    def __init__(self, port: int, cut_after: int | None):
        self.target, self.cut_after = port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            limit = self.cut_after
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    def _pump(self, src, dst, limit) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[:max(0, limit - sent)])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
