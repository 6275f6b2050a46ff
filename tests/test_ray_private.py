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


@pytest.mark.integration
def test_the_gcs_addresses_on_this_host_include_a_running_head(stack):
    ray_head = stack.services["ray"].info
    assert f"127.0.0.1:{ray_head['gcs_port']}" in ray_private.gcs_addresses_on_this_host()
