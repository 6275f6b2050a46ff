"""`ray start` for a node of the local stack: every Ray server on 127.0.0.1, the Ray Client server off.

    python infra/ray_loopback.py start --head --node-ip-address=127.0.0.1 ...     (infra.stack runs it)
    python infra/ray_loopback.py start --address=127.0.0.1:PORT --node-ip-address=127.0.0.1 ...

What Ray 2.60 does (its code, and `tests/test_local_stack_security.py` on this machine):
- Its servers listen on loopback only when the node's address is a localhost one; otherwise the GCS, the raylet
  (node and object managers), every core worker and the dashboard agent's gRPC and metrics ports listen on all
  interfaces, and the dashboard agent's HTTP port, the runtime env agent and the Ray Client server on the
  node's address. Apart from the dashboard's (--dashboard-host), no flag or setting binds one of them to
  127.0.0.1 on its own.
- On Linux `ray start` (and `ray.init`) replace a localhost --node-ip-address by the machine's external address
  (`resolve_ip_for_localhost`), unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps 127.0.0.1 (it is what
  Ray does on macOS and Windows). The stack puts that setting in the environment of every Ray process it
  starts, so drivers and workers connect through 127.0.0.1 too.
- With it, `ray start --address` refuses to join a node ("Multi-node Ray clusters are not supported on Windows
  and OSX"): the one check this launcher lets pass, for the CLI alone. The address resolution keeps seeing the
  setting, so the joining node's address stays 127.0.0.1.
- `ray start --head` always starts the Ray Client server (port 10001 by default) when grpcio is installed, and
  refuses --ray-client-server-port=0. This launcher starts it only when a --ray-client-server-port is given.

Both adjustments touch `ray.scripts.scripts` (the CLI module) only, through infra/ray_private.py (the one
module of private Ray APIs: it refuses to start a node, naming the attribute, if a Ray upgrade moved one);
tests/test_ray_private.py pins them and tests/test_local_stack_security.py checks the sockets they give.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Ray reads it when ray is first imported: in the environment of every Ray process of the stack.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CLIENT_PORT_FLAG = "--ray-client-server-port"


def ray_start_command(*args: str) -> list[str]:
    """The argv of `ray start ARGS` through this launcher, with the interpreter of this environment."""
    return [sys.executable, str(Path(__file__).resolve()), "start", *args]


def main(argv: list[str]) -> int:
    os.environ.update(LOOPBACK_ENV)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the repository root imports
    # Imported only now, after the setting above (Ray reads it at import), and only here: the stack's own
    # process, which imports this file for LOOPBACK_ENV, never imports Ray.
    from infra.ray_private import ray_start_on_loopback

    return ray_start_on_loopback(argv, client_server=any(arg.startswith(CLIENT_PORT_FLAG) for arg in argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
