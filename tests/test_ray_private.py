"""Every private Ray API the project relies on (infra/ray_private.py) is still where Ray 2.60 keeps it.

A Ray upgrade that moves one fails here by name; the flow and the search only use them as hints.
"""

from __future__ import annotations

import inspect

import pytest
import ray

from infra import ray_private


def test_the_private_apis_exist_with_the_shapes_we_call():
    assert ray.__version__ == "2.60.0"  # the version these were read from; re-read them on an upgrade
    for name in ("find_gcs_addresses", "create_package", "prepare_config", "validate_config"):
        assert callable(getattr(ray_private, name)), name
    assert callable(ray_private._global_state.get_max_resources_from_cluster_config)
    assert isinstance(ray_private.class_cache.ENV_VARS_TO_PROPAGATE, (set, frozenset, list, tuple))
    assert {"include_gitignore", "excludes"} <= set(inspect.signature(ray_private.create_package).parameters)
    from ray.serve._private.api import serve_start  # serve_client_start's
    assert {"http_options", "proxy_location", "grpc_options", "controller_options"} <= set(
        inspect.signature(serve_start).parameters)
    from ray.serve._private.client import ServeControllerClient
    assert "deploy_apps" in vars(ServeControllerClient)


def test_tune_no_longer_propagates_what_we_drop():
    before = ray_private.tune_propagated_env_vars()
    try:
        ray_private.stop_tune_propagating(frozenset({"AWS_SECRET_ACCESS_KEY"}))
        assert "AWS_SECRET_ACCESS_KEY" not in ray_private.tune_propagated_env_vars()
        assert before - {"AWS_SECRET_ACCESS_KEY"} <= ray_private.tune_propagated_env_vars()
    finally:
        ray_private.class_cache.ENV_VARS_TO_PROPAGATE = before


def test_the_loopback_launchers_private_apis_are_where_it_patches_them():
    """infra/ray_loopback.py's adjustments (through ray_private.ray_start_on_loopback) patch these names."""
    from ray._private import ray_constants
    from ray.scripts import scripts

    assert scripts.ray_constants is ray_constants and isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert callable(scripts.get_ray_client_dependency_error) and callable(scripts.main)
    assert "get_ray_client_dependency_error" in inspect.getsource(scripts.start.callback)  # `ray start` asks it


def test_a_private_api_that_is_gone_is_said_by_name_never_a_silent_no_op(monkeypatch):
    monkeypatch.delattr(ray_private.class_cache, "ENV_VARS_TO_PROPAGATE")
    with pytest.raises(ray_private.RayPrivateApiError, match="class_cache has no ENV_VARS_TO_PROPAGATE any more"):
        ray_private.stop_tune_propagating(frozenset({"AWS_SECRET_ACCESS_KEY"}))
    from ray.scripts import scripts

    monkeypatch.delattr(scripts, "get_ray_client_dependency_error")
    constants = scripts.ray_constants
    with pytest.raises(ray_private.RayPrivateApiError, match="scripts has no get_ray_client_dependency_error"):
        ray_private.ray_start_on_loopback(["start", "--head"], client_server=False)
    assert scripts.ray_constants is constants  # refused before anything was patched


@pytest.mark.integration
def test_the_gcs_addresses_on_this_host_include_a_running_head(stack):
    ray_head = stack.services["ray"].info
    assert f"127.0.0.1:{ray_head['gcs_port']}" in ray_private.gcs_addresses_on_this_host()
