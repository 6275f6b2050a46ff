"""The GPU check (benchmarks/gpu_check.py) in its CPU smoke mode: every check but the CUDA calls, end to end.

The figures are not asserted as speeds (benchmarks print those); the test asserts that each check ran and what
each must show: finite fp16 losses with a live loss scale, a divergence the guard stopped, both heads trained,
an ONNX export that agrees with the network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # starts a local Ray (its own, as the benchmarks do) in a CLI process
def test_smoke_runs_every_check_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--work", str(tmp_path / "work"),
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    print("\n" + proc.stdout[proc.stdout.index("| check"):])  # the smoke's table, for the log

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
    assert "FAIL" not in proc.stdout and proc.stdout.count("\n| ") == 15  # header + 14 rows


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
