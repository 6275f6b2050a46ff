"""Ports that cannot collide: the stack's ports of one start are picked together, each held until all are
chosen, from the range neither the kernel nor Ray's workers hand out; and the Ray head starts 10 times in a
row, every time, on the ports picked for it (the old one-port-at-a-time picking once gave the GCS and the Ray
Client server one port).
`python -m benchmarks.stack_starts --starts 30` runs the longer series and prints its timings."""

from __future__ import annotations

import socket

import pytest

from benchmarks.stack_starts import start_ray_heads
from infra.ports import RAY_WORKER_PORTS_END, pick_ports, quiet_range
from infra.stack import HOST


def test_one_pick_gives_distinct_ports_outside_the_kernels_and_rays_ranges():
    ephemeral_start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    quiet = quiet_range()
    assert quiet.start == RAY_WORKER_PORTS_END + 1 and quiet.stop == ephemeral_start
    for _ in range(200):
        ports = pick_ports(5)
        assert len(set(ports)) == 5 and all(p in quiet for p in ports), ports


def test_picked_ports_are_free_and_a_taken_one_is_never_picked():
    held = [socket.socket() for _ in range(50)]
    try:
        taken = set()
        for sock, port in zip(held, pick_ports(50), strict=True):
            sock.bind((HOST, port))  # every picked port was released and can be bound
            taken.add(port)
        for _ in range(100):  # while those are bound, no pick returns one of them
            assert not taken & set(pick_ports(4))
    finally:
        for sock in held:
            sock.close()


@pytest.mark.integration
def test_the_ray_head_starts_10_times_in_a_row(tmp_path):
    """Only the Ray head (its GCS, dashboard and agent ports are the ones picked together), started and stopped
    by pid 10 times; never with a Ray Client server, which only `ray_client=True` starts. Each start must listen
    on the ports picked for it (start_ray_heads raises otherwise), and each start picks afresh."""
    times, ports = start_ray_heads(tmp_path / "state", 10)
    print(f"\n[ports] 10 starts of the Ray head, all up: start {min(times):.1f}-{max(times):.1f} s; "
          f"{len(ports)} distinct port pairs")
    # 10 pairs drawn from ~12,700 ports: a repeat has odds of about 1 in 3 million, a fixed port list of 1.
    assert len(ports) == 10
    assert all(port in quiet_range() for pair in ports for port in pair)
