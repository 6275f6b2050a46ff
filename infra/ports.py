"""Ports for the local stack's servers, picked so that they cannot collide.

Two calls of "bind port 0, read the number, close" may return the same number: the kernel hands the port out
again as soon as it is closed. `pick_ports(n)` keeps each probe socket bound until all n ports are chosen and
releases them together, just before the servers start, so the n are distinct. They come from the range between
Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768-60999 on Linux): ports that nothing
on the machine is handed by itself (a bind to port 0, an outgoing connection, a Ray worker), so between the
release and the server's own bind only another explicit pick could take one.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

HOST = "127.0.0.1"
RAY_WORKER_PORTS_END = 19999  # Ray's default --max-worker-port
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
IANA_EPHEMERAL_START = 49152  # where there is no Linux range to read (macOS, Windows)
MIN_RANGE = 1000  # fewer quiet ports than this: let the kernel pick instead
ATTEMPTS = 200


def quiet_range() -> range:
    """Ports above Ray's worker range and below the kernel's ephemeral range (empty if too few)."""
    try:
        ephemeral_start = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = IANA_EPHEMERAL_START
    ports = range(RAY_WORKER_PORTS_END + 1, ephemeral_start)
    return ports if len(ports) >= MIN_RANGE else range(0)


def pick_ports(count: int, host: str = HOST) -> list[int]:
    """`count` distinct free TCP ports on `host`, each held until all are picked, then released together."""
    ports = quiet_range()
    held: list[socket.socket] = []
    try:
        for _ in range(ATTEMPTS):
            sock = socket.socket()
            try:
                sock.bind((host, random.choice(ports) if ports else 0))
            except OSError:  # in use: draw another
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                break
        else:
            raise RuntimeError(f"no {count} free ports on {host} after {ATTEMPTS} attempts in {ports}")
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = HOST) -> int:
    """One free port (a service started on its own; pick several together with `pick_ports`)."""
    return pick_ports(1, host)[0]
