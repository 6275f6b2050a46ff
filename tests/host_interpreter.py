"""An interpreter that holds only what the GPU host's python3 holds, built in seconds from this environment.

A venv of this Python without pip or system site-packages, whose one `.pth` line names a folder of symbolic
links to the host's packages (benchmarks.gpu_host.HOST_PACKAGES and what they need) as installed here. Nothing
else is importable: no Ray, MLflow or boto3, unless a PYTHONPATH brings them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu_host import HOST_PACKAGES, closure


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The site-packages entries a distribution installed: its packages, modules and .dist-info folder."""
    entries = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first not in ("..", "__pycache__") and not first.endswith(".data"):
            entries.add(first)
    return entries


def make_host_interpreter(where: Path) -> Path:
    """A Python at where/venv/bin/python seeing only the host's packages; returns its path."""
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where / "venv")], check=True)
    site = where / "host-site"
    site.mkdir(parents=True)
    for name in closure(list(HOST_PACKAGES), python_version):
        dist = metadata.distribution(name)
        base = Path(dist.locate_file(""))
        for entry in top_level_entries(dist):
            if (base / entry).exists() and not (site / entry).exists():
                (site / entry).symlink_to(base / entry)
    venv_site = next((where / "venv" / "lib").glob("python3*/site-packages"))
    (venv_site / "host.pth").write_text(str(site) + "\n")
    return where / "venv" / "bin" / "python"
