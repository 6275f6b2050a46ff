"""A TCP forwarder for fault tests: 127.0.0.1:<port> -> a target server, that can go down and come back.

    proxy = FaultProxy(target_port).start()
    proxy.down("closed")   # drop open connections (RST); close the listener: new connects are refused
    proxy.down("reset")    # listen again, but reset every new connection (counted in `refused`)
    proxy.up()             # forward again, on the same port

Used to take an in-memory server (moto) away from its clients without losing its data. Threads, one pair
per connection; fine for the few connections a test makes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

HOST = "127.0.0.1"
_CHUNK = 1 << 16


def _hard_close(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed server's connection ends; wakes threads blocked in recv."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = "up"  # "up" | "closed" | "reset"
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections reset on arrival while down("reset")
        self.refused_requests: list[str] = []  # their first line (e.g. "PUT /bucket/key HTTP/1.1")
        self.dropped = 0  # open connections cut by down()
        self.events: list[tuple[float, str]] = []  # (time.time(), mode) at each change
        self._lock = threading.Lock()
        self._open: dict[int, _Pair] = {}
        self._listener: socket.socket | None = None

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._listen()
        self.events.append((time.time(), "up"))
        return self

    def down(self, mode: str = "closed") -> None:
        if mode not in ("closed", "reset"):
            raise ValueError(f"mode must be 'closed' or 'reset', got {mode!r}")
        with self._lock:
            self.mode = mode
            pairs, self._open = list(self._open.values()), {}
            self.dropped += len(pairs)
        for pair in pairs:
            pair.cut()
        if mode == "closed":
            self._close_listener()
        elif self._listener is None:
            self._listen()
        self.events.append((time.time(), mode))

    def up(self) -> None:
        with self._lock:
            self.mode = "up"
        if self._listener is None:
            self._listen()
        self.events.append((time.time(), "up"))

    def close(self) -> None:
        self.down("closed")

    # -- plumbing --------------------------------------------------------------------------------
    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the same port again at once
        sock.bind((HOST, self.port))
        sock.listen(128)
        sock.settimeout(0.1)  # the accept loop notices a closed listener within 0.1 s
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True).start()

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "reset":
                    self.refused += 1
            if mode == "reset":
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            if mode != "up":
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _hard_close(client)
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self._lock:
                self.accepted += 1
                self._open[id(pair)] = pair
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _refuse(self, client: socket.socket) -> None:
        """Note what the client was about to ask, then reset the connection."""
        try:
            client.settimeout(1.0)
            head = client.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError:
            head = ""
        with self._lock:
            self.refused_requests.append(head)
        _hard_close(client)

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other direction may still be busy
        except OSError:
            with self._lock:
                self._open.pop(id(pair), None)
            pair.cut()
            return
        with self._lock:
            pair.directions -= 1
            finished = pair.directions == 0 and self._open.pop(id(pair), None) is not None
        if finished:
            pair.client.close()
            pair.upstream.close()


class _Pair:
    """A client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream, self.directions = client, upstream, 2

    def cut(self) -> None:
        _hard_close(self.client)
        _hard_close(self.upstream)
