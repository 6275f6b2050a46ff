"""The few private Ray APIs the project uses, in one place: each has no public equivalent in Ray 2.60.

tests/test_ray_private.py imports every one of them, so a Ray upgrade that moves or renames one fails
loudly there, not silently in a flow (the callers treat them as hints and carry on without them).
"""

from __future__ import annotations

from ray._private.runtime_env.packaging import create_package
from ray._private.services import find_gcs_addresses
from ray._private.state import state as _global_state
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.tune.execution import class_cache

# Used as they are (by tests/test_cluster_config.py): `ray up`'s own config check and fill-in, and the
# package `ray job submit --working-dir` uploads.
__all__ = ["create_package", "gcs_addresses_on_this_host", "max_resources_from_cluster_config", "prepare_config",
           "serve_client_start", "stop_tune_propagating", "tune_propagated_env_vars", "validate_config"]


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
    return _global_state.get_max_resources_from_cluster_config()


def stop_tune_propagating(names: frozenset[str]) -> None:
    """Ray Tune copies some of the driver's environment variables into every trial actor's runtime env (which
    Ray's runtime env agent logs in clear); drop `names` from that list."""
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if propagated is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - names


def tune_propagated_env_vars() -> set[str]:
    return set(class_cache.ENV_VARS_TO_PROPAGATE)
