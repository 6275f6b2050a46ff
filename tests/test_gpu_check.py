"""The GPU check (benchmarks/gpu_check.py) in its CPU smoke mode, run the GPU host's way: every check but the
CUDA calls, end to end, through the folder that travels to the host and the command pasted there.

The figures are not asserted as speeds (benchmarks print those); the test asserts that each check ran and what
each must show: finite fp16 losses with a live loss scale, a divergence the guard stopped, both heads trained,
an ONNX export that agrees with the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, gpu_host
from tests.host_interpreter import make_host_interpreter

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # PyPI downloads, a local Ray of its own, CLI processes
def test_the_host_command_runs_every_check_with_only_the_hosts_packages_and_the_folder(tmp_path):
    """The GPU host's way, on this CPU: `gpu_check.sh --prepare` builds the travelling folder (for this Python,
    a fast xz preset), then the exact command it prints runs under an interpreter that holds only the host's
    packages (no Ray, MLflow or boto3 of its own), with the CPU smoke sizes. Every check runs and passes, the
    results folder holds the figures, and each module the check imported came from that interpreter, the
    unpacked folder or this repository."""
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    host_python = make_host_interpreter(tmp_path / "host")
    for missing in ("ray", "mlflow", "boto3"):
        assert subprocess.run([str(host_python), "-c", f"import {missing}"], capture_output=True).returncode == 1

    folder = tmp_path / "gpu-host"
    prepared = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--prepare", str(folder),
                               "--python-version", python_version, "--xz-preset", "1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert gpu_host.folder_size(folder) <= gpu_host.FOLDER_LIMIT
    assert re.search(r"travels with the working tree: [\d.]+ MiB", prepared.stdout)
    assert gpu_host.travelling_size(folder) <= gpu_host.TRAVEL_LIMIT
    command = prepared.stdout.strip().splitlines()[-1]
    assert command == gpu_host.host_command(str(folder)) and len(command) <= gpu_host.COMMAND_LIMIT
    manifest = json.loads((folder / gpu_host.MANIFEST).read_text())
    assert manifest["python"] == python_version and manifest["packages"]["ray"] == "2.60.0"
    assert not {"mlflow", "boto3", "torch", "numpy"} & set(manifest["packages"])  # the host's, or not needed

    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(host_python), OUT=str(results), EQFACE_GPU_WORK=str(tmp_path / "work"),
               EQFACE_GPU_CHECK_LIMIT_S="1700", PATH="/usr/bin:/bin")  # no venv on the PATH either
    proc = subprocess.run(["bash", "-c", command + " --smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in results.iterdir()) == ["figures.json", "imports.txt", "log.txt", "table.md"]
    log = (results / "log.txt").read_text()
    assert f"unpacked {manifest['files']:,} files of {len(manifest['packages'])} packages" in log
    assert log.index("| 0 synthetic shards") < log.index("| 1 throughput") < log.index(" s in all")  # as they end
    print("\n" + (results / "table.md").read_text())  # the smoke's table, for the log

    figures = json.loads((results / "figures.json").read_text())["figures"]
    for amp in ("bf16", "fp16"):
        ray_rate, plain = figures[f"throughput.{amp}.ray_images_per_s"], figures[f"throughput.{amp}.plain_images_per_s"]
        assert ray_rate > 0 and plain > 0 and figures[f"throughput.{amp}.ratio"] == pytest.approx(ray_rate / plain)
    assert figures["stability.iterations"] >= gpu_check.SMOKE.stability_iterations
    assert figures["stability.losses_finite"] is True and figures["stability.final_scale"] > 0
    assert figures["stability.guard_stopped"] is True
    assert figures["stability.guard_message"].startswith(("loss is", "weights are not finite"))
    assert figures["head.full.step_ms"] > 0 and figures["head.sharded.step_ms"] > 0
    assert figures["head.full.peak_gib"] is None  # GPU memory: CUDA only
    assert figures["pipeline.images_per_s"] > 0
    assert figures["onnx.max_rel_diff"] <= gpu_check.ONNX_TOLERANCE
    assert all(figures[f"time.{name}_s"] > 0 for name in gpu_check.SMOKE.caps)
    table = (results / "table.md").read_text()
    assert "FAIL" not in table and table.count("\n| ") == 16  # header + 15 rows

    allowed = (str(tmp_path / "host"), str(tmp_path / "work" / "site"), str(ROOT) + "/", sys.base_prefix)
    origins = [line.split("\t") for line in (results / "imports.txt").read_text().splitlines()]
    outside = [(name, path) for name, path in origins
               if path and not path.startswith(allowed) and not (name.startswith("torch.") and "/" not in path)]
    assert not outside  # torch's generated modules name a bare file
    assert any(path.startswith(str(tmp_path / "work" / "site" / "ray")) for _, path in origins)
    assert not any(name.split(".")[0] in ("mlflow", "boto3", "matplotlib") for name, _ in origins)


def test_unpack_refuses_another_python_or_a_damaged_archive_and_keeps_modes(tmp_path):
    folder, site = tmp_path / "folder", tmp_path / "site"
    folder.mkdir()
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        member = tarfile.TarInfo("ray/core/raylet")
        member.size, member.mode = 4, 0o755
        tar.addfile(member, io.BytesIO(b"\x7fELF"))
    (folder / gpu_host.ARCHIVE).write_bytes(payload.getvalue())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifest = {"python": running, "packages": {"ray": "2.60.0"}, "files": 1,
                "archive_sha256": hashlib.sha256(payload.getvalue()).hexdigest()}
    (folder / gpu_host.MANIFEST).write_text(json.dumps(manifest))
    assert gpu_host.unpack(folder, site)["files"] == 1
    assert (site / "ray/core/raylet").stat().st_mode & 0o111  # executables stay executable

    (folder / gpu_host.MANIFEST).write_text(json.dumps({**manifest, "python": "2.7"}))
    with pytest.raises(gpu_host.PrepareError, match=f"built for Python 2.7, this is {running}"):
        gpu_host.unpack(folder, site)
    (folder / gpu_host.MANIFEST).write_text(json.dumps({**manifest, "archive_sha256": "0" * 64}))
    with pytest.raises(gpu_host.PrepareError, match="sha256 differs"):
        gpu_host.unpack(folder, site)


def test_the_travelling_set_is_rays_needs_less_the_hosts():
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    carried = gpu_host.carried_packages(python_version)
    assert carried["ray"] == "2.60.0" and {"click", "jsonschema", "msgpack", "pydantic"} <= set(carried)
    host = gpu_host.closure(list(gpu_host.HOST_PACKAGES), python_version)
    assert not set(carried) & set(host) and {"torch", "pyarrow", "pandas", "protobuf", "packaging"} <= set(host)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA device; --smoke runs on the CPU" in err and err.count("\n") == 1


@pytest.mark.integration  # a shell script in a process of its own (installs nothing: --dry-run)
def test_wrapper_installs_the_pinned_cuda_torch_and_runs_the_check(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: the pins it installs come from pyproject.toml; nothing is installed."""
    venv = tmp_path / "venv"
    env = {**os.environ, "EQFACE_GPU_VENV": str(venv), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "wheels")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--json", "f.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stderr.splitlines() if line.startswith("+ ")]
    torch_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert commands[1].endswith(f"--no-index --find-links {tmp_path / 'wheels'} {torch_pin}")
    assert f"--constraint {venv / 'constraints.txt'} {ROOT} onnx onnxruntime" in commands[2]
    assert commands[-1] == f"{venv}/bin/python -m benchmarks.gpu_check --json f.json"
    assert not venv.exists()
