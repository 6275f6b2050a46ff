"""The private Ray APIs the project uses, all of them, in one place: each has no public equivalent in Ray 2.60.

tests/test_ray_private.py pins every one of them, so a Ray upgrade that moves or renames one fails there by
name. At run time an attribute that is gone raises RayPrivateApiError naming it, never a silent no-op: the
credential filter of the margin search and the loopback launcher of the stack's nodes would otherwise stop
protecting anything without a word.
"""

from __future__ import annotations

import sys
import types

import ray
import ray._private.ray_constants as ray_constants
from ray._private.runtime_env.packaging import create_package
from ray._private.services import find_gcs_addresses
from ray._private.state import state as _global_state
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.tune.execution import class_cache

# Used as they are (by tests/test_cluster_config.py): `ray up`'s own config check and fill-in, and the
# package `ray job submit --working-dir` uploads.
__all__ = ["RayPrivateApiError", "create_package", "gcs_addresses_on_this_host", "max_resources_from_cluster_config",
           "prepare_config", "ray_start_on_loopback", "serve_client_start", "stop_tune_propagating",
           "tune_propagated_env_vars", "validate_config"]


class RayPrivateApiError(RuntimeError):
    """A private Ray API the project relies on is gone: re-read it for this Ray version."""


def _require(owner: types.ModuleType, *names: str) -> None:
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise RayPrivateApiError(f"Ray {ray.__version__}: {owner.__name__} has no {', '.join(missing)} any more; "
                                 "infra/ray_private.py was written against Ray 2.60 and must be re-read")


def gcs_addresses_on_this_host() -> list[str]:
    """The GCS addresses of every Ray cluster running on this host (the margin search warns when there are
    several: Ray Train's placement-group cleaner then finds its own only through RAY_ADDRESS)."""
    return list(find_gcs_addresses())


def serve_client_start(schema):
    """Start Serve (controller, HTTP proxy) with a Serve config file's http_options and proxy_location, and return
    the client whose `deploy_apps(schema)` applies the file: what `serve run <config file>` does. The public
    `serve.start` / `serve.run` take one application object and no config file. (Imported here: Serve takes
    seconds to import, and the flow's modules that use this file need none of it.)"""
    from ray.serve._private.api import serve_start

    return serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                        grpc_options=schema.grpc_options.model_dump(), controller_options=schema.controller_options)


def max_resources_from_cluster_config() -> dict[str, float] | None:
    """What an autoscaler may grow the cluster to (Ray Train's own check reads the same); None without one."""
    if not hasattr(_global_state, "get_max_resources_from_cluster_config"):
        raise RayPrivateApiError(f"Ray {ray.__version__}: ray._private.state.state has no "
                                 "get_max_resources_from_cluster_config any more; re-read infra/ray_private.py")
    return _global_state.get_max_resources_from_cluster_config()


def stop_tune_propagating(names: frozenset[str]) -> None:
    """Ray Tune copies some of the driver's environment variables into every trial actor's runtime env (which
    Ray's runtime env agent logs in clear); drop `names` from that list."""
    _require(class_cache, "ENV_VARS_TO_PROPAGATE")
    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - names


def tune_propagated_env_vars() -> set[str]:
    _require(class_cache, "ENV_VARS_TO_PROPAGATE")
    return set(class_cache.ENV_VARS_TO_PROPAGATE)


def ray_start_on_loopback(argv: list[str], client_server: bool) -> int:
    """`ray start ARGV` with the two adjustments infra/ray_loopback.py explains: its CLI (alone) may join a node
    while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every address on 127.0.0.1, and the Ray Client server starts
    only when `client_server`. The caller puts that setting in the environment before Ray is first imported.
    (`ray.scripts.scripts`, the CLI, is imported here: it takes a second and only this launcher needs it.)"""
    from ray.scripts import scripts

    _require(scripts, "ray_constants", "get_ray_client_dependency_error", "main")
    _require(ray_constants, "ENABLE_RAY_CLUSTER")
    if scripts.ray_constants is not ray_constants:
        raise RayPrivateApiError(f"Ray {ray.__version__}: ray.scripts.scripts no longer reads its constants from "
                                 "ray._private.ray_constants; re-read infra/ray_private.py")
    # The CLI's own view of the constants: joining a node is allowed; everything else reads the real ones.
    cli_constants = types.ModuleType(ray_constants.__name__)
    cli_constants.__dict__.update(vars(ray_constants))
    cli_constants.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = cli_constants
    if not client_server:
        # `ray start` starts the client server when this finds grpcio; Ray's own check of an explicit port is
        # elsewhere and unchanged.
        scripts.get_ray_client_dependency_error = lambda: ImportError("Ray Client server off (infra.stack)")
    sys.argv = ["ray", *argv]
    return scripts.main()
