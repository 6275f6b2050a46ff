"""Deploy the recognition service of a Serve config file (configs/serve.yaml) on the Ray cluster, or remove it.

    ray job submit --address "$RAY_ADDRESS" --working-dir . \
      --runtime-env-json "{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"$MLFLOW_TRACKING_URI\"}}" \
      -- python -m serve.deploy configs/serve.yaml args.model=models:/eqface@candidate http.port=8000 \
         replicas.FaceModel=2
    ray job submit --address "$RAY_ADDRESS" --working-dir . -- python -m serve.deploy --delete

Run as a Ray job, it gives the application the job's uploaded working dir (this repository) and its
MLFLOW_TRACKING_URI, starts Serve's HTTP proxy where the file says (127.0.0.1 unless told otherwise) and
waits until the application runs. Overrides: `args.<key>=value` (serve/config.py), `http.port=`, `http.host=`,
`replicas.<Deployment>=N`. A proxy on an address other than loopback needs `args.api_token_file`: no open
endpoint without a token.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from serve.config import ServiceConfig, ServiceConfigError

DEPLOYMENTS = ("FaceModel", "State", "Api")


class DeployError(ValueError):
    """A config the deployment refuses, as one line."""


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    """The Serve config file with the overrides applied; its one application's args validated."""
    try:
        config = yaml.safe_load(Path(path).read_text())
        app = config["applications"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise DeployError(f"{path}: not a Serve config file with one application ({type(exc).__name__}: {exc})"
                          ) from None
    if len(config["applications"]) != 1:
        raise DeployError(f"{path}: {len(config['applications'])} applications; this service is one")
    config = copy.deepcopy(config)
    app = config["applications"][0]
    app.setdefault("args", {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DeployError(f"override {item!r}: expected key=value")
        value = yaml.safe_load(raw) if raw else ""
        section, _, name = key.partition(".")
        if section == "args" and name:
            app["args"][name] = value
        elif section == "http" and name in ("host", "port"):
            config.setdefault("http_options", {})[name] = value
        elif section == "replicas" and name in DEPLOYMENTS:
            if not isinstance(value, int) or value < 1:
                raise DeployError(f"override {item!r}: replicas must be a whole number >= 1")
            if name == "State" and value != 1:
                raise DeployError(f"override {item!r}: State has exactly one replica (it counts every stream's "
                                  "frames in one place)")
            entries = app.setdefault("deployments", [])
            entry = next((d for d in entries if d.get("name") == name), None)
            if entry is None:
                entry = {"name": name}
                entries.append(entry)
            entry["num_replicas"] = value
        else:
            raise DeployError(f"override {item!r}: expected args.<key>, http.host, http.port or "
                              f"replicas.<{'|'.join(DEPLOYMENTS)}>")
    try:
        settings = ServiceConfig.from_args(app["args"])
    except ServiceConfigError as exc:
        raise DeployError(f"{path}: {exc}") from None
    host = str(config.get("http_options", {}).get("host", "127.0.0.1"))
    if not _loopback(host) and not settings.api_token_file:
        raise DeployError(f"{path}: http_options.host {host} is reachable from other machines: set "
                          "args.api_token_file (a bearer token every request must carry) or keep 127.0.0.1 and "
                          "put an authenticating proxy in front")
    return config


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def app_runtime_env(app: dict[str, Any], job_env: dict[str, Any], environ) -> dict[str, Any]:
    """The application's runtime env: its own, plus the job's uploaded working dir (this repository: the
    replicas import serve.app from it) and MLFLOW_TRACKING_URI (for a models:/ URI), unless it names its own."""
    runtime_env = copy.deepcopy(app.get("runtime_env") or {})
    if "working_dir" not in runtime_env and job_env.get("working_dir"):
        runtime_env["working_dir"] = job_env["working_dir"]
    if environ.get("MLFLOW_TRACKING_URI"):
        runtime_env.setdefault("env_vars", {}).setdefault("MLFLOW_TRACKING_URI", environ["MLFLOW_TRACKING_URI"])
    return runtime_env


def deploy(config: dict[str, Any], wait_s: float = 300) -> str:
    """Deploy on the cluster this process is a driver of; returns the service's URL."""
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from infra.ray_private import serve_client_start

    ray.init(address="auto", namespace="serve", log_to_driver=False)  # never a new cluster
    app = config["applications"][0]
    app["runtime_env"] = app_runtime_env(app, dict(ray.get_runtime_context().runtime_env), os.environ)
    schema = ServeDeploySchema.model_validate(config)
    client = serve_client_start(schema)
    client.deploy_apps(schema)
    name = app["name"]
    deadline = time.monotonic() + wait_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            break
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {name!r} failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"application {name!r} not running after {wait_s:.0f} s "
                               f"({status.status if status else 'not started'}: {status.message if status else ''})")
        time.sleep(1)
    http = schema.http_options
    return f"http://{http.host}:{http.port}{app.get('route_prefix') or '/'}"


def delete(name: str) -> None:
    import ray
    from ray import serve

    ray.init(address="auto", namespace="serve", log_to_driver=False)  # never a new cluster
    serve.delete(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/serve.yaml")
    parser.add_argument("overrides", nargs="*", help="args.<key>=value, http.port=N, replicas.<Deployment>=N")
    parser.add_argument("--delete", action="store_true", help="remove the application instead")
    parser.add_argument("--wait-s", type=float, default=300)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.delete:
        delete(config["applications"][0]["name"])
        print(f"deleted application {config['applications'][0]['name']!r}")
        return 0
    url = deploy(config, args.wait_s)
    print(f"EQFace recognition service running at {url}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
