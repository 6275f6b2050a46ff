"""Shared fixtures: the real local services (Ray head, MLflow server, S3-compatible server) for a test session.

They run from a temporary state dir, on free ports on 127.0.0.1, and are stopped by pid at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"


class StartedAProcess(AssertionError):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """The unit loop (`-m "not integration"`) starts no services and no CLI processes: a test without the
    `integration` mark that starts a program, in its set-up, its body or its tear-down, fails naming it."""
    if item.get_closest_marker("integration"):
        yield
        return
    # (os.system stays: tests pickle it by name, and a patched one would not pickle.)
    patched = {(subprocess.Popen, "_execute_child"): _refuse_popen,
               (os, "posix_spawn"): _refuse("os.posix_spawn"), (os, "posix_spawnp"): _refuse("os.posix_spawnp")}
    saved = {key: getattr(*key) for key in patched}
    for (owner, name), replacement in patched.items():
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)


def _refuse_popen(self, args, *rest, **kwargs):
    raise StartedAProcess(f"a unit test started a process: {args!r}; mark the test `integration`")


def _refuse(what):
    def refuse(*args, **kwargs):
        raise StartedAProcess(f"a unit test started a process with {what}{args[:2]!r}; mark the test "
                              "`integration`")
    return refuse


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """MLflow + Ray head (2 CPUs, token auth on). Tests that need S3 call `stack.start_s3()`."""
    state = tmp_path_factory.mktemp("stack")
    services = Stack.load(state)
    try:
        services.start_mlflow()
        services.start_ray(num_cpus=2)
        yield services
    finally:
        services.stop_all()


def submit_flow(stack: Stack, args: list[str], timeout: float = 900, extra_env: dict[str, str] | None = None,
                script: str = "flows/eqface.py") -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python flows/eqface.py ARGS` (or another script), as a user runs
    it."""
    env = {**os.environ, **stack.env()}
    # Only the tracking URI travels in the runtime env: S3 keys reach jobs through the Ray head's own
    # environment (infra.stack), never through job metadata that Ray logs.
    # RAY_ADDRESS pins the driver to this cluster's GCS: with several Ray clusters on one host (tests), Ray's
    # own lookup can otherwise pick another one for helper actors.
    job_env = {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
               "RAY_ADDRESS": f"127.0.0.1:{stack.services['ray'].info['gcs_port']}", **(extra_env or {})}
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", env["RAY_ADDRESS"], "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"env_vars": job_env}),
        "--", "python", script, *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
