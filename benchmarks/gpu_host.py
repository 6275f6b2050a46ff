"""The GPU check's travelling folder: Ray and the few packages a bare GPU host lacks, for a host without network.

    python -m benchmarks.gpu_host prepare DIR [--python-version 3.12]   # here, once: from PyPI, ~30 s
    python3 -m benchmarks.gpu_host unpack DIR SITE                      # on the host: stdlib only, seconds

The GPU host this project can get runs its own `python3` (3.12) with CUDA PyTorch, numpy, pyarrow, pandas,
scipy, pillow, pyyaml, onnx, onnxruntime, requests, tqdm and psutil, but no Ray, MLflow or boto3, and nothing
can be installed there. Everything a command needs travels with the repository, 64 MiB at most, and Ray's
wheel alone is 79 MB. `prepare` builds DIR once on an ordinary machine:

* `site.tar.xz`: a site-packages tree holding Ray (without `ray/jars`, `ray/rllib`, `ray/llm` and the tests) and
  every package that Ray's `data`, `train` and `tune` extras need beyond what the host has (`HOST_PACKAGES`
  and what they depend on), at the versions installed in this environment, as wheels for the host's Python
  and manylinux x86-64 from PyPI;
* `manifest.json`: the Python it was built for, each package and version, the archive's size and sha256.

It prints the folder's size (it refuses above 60 MiB, and a working tree that would travel above 64 MiB)
and the one-line command to paste on the host (at most 2,000 characters; `HOST_COMMAND`). `unpack` needs
nothing but the standard library: the host's interpreter runs it before anything else.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the host's python3 holds, as its description lists it; their own dependencies count as present too.
HOST_PACKAGES = ("torch", "numpy", "pyarrow", "pandas", "scipy", "pillow", "pyyaml", "onnx", "onnxruntime",
                 "requests", "tqdm", "psutil")
# Ray with the extras the check uses; the rest of what the check imports is the host's or this repository's.
CARRIED = ("ray[data,train,tune]",)
RAY_LEFT_OUT = ("ray/jars/", "ray/rllib/", "ray/llm/")  # Java, RL and LLM libraries: 60 MB the check never loads
FOLDER_LIMIT = 60 * 2**20  # the prepared folder
TRAVEL_LIMIT = 64 * 2**20  # the whole working tree that travels to the host, the folder included
COMMAND_LIMIT = 2000  # characters of one host command
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
ARCHIVE, MANIFEST = "site.tar.xz", "manifest.json"


class PrepareError(RuntimeError):
    pass


def host_command(folder: str) -> str:
    """The one line to paste on the host, from the repository root; its files land in $OUT (default ./gpu-results)."""
    return f'bash benchmarks/gpu_check.sh --host {folder} --results "${{OUT:-gpu-results}}"'


# -- what travels ------------------------------------------------------------------------------------------------
def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _extras(requirement: str) -> set[str]:
    found = re.search(r"\[([^\]]*)\]", requirement)
    return {e.strip() for e in found.group(1).split(",")} if found else set()


def _requires(dist: metadata.Distribution, extras: set[str], python_version: str) -> list[str]:
    """The distribution's requirements for these extras, markers evaluated for the host's Python on Linux."""
    from packaging.requirements import Requirement  # Ray's own dependency: here at prepare time, not on the host

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    wanted = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
            wanted.append(str(req.name) + (f"[{','.join(sorted(req.extras))}]" if req.extras else ""))
    return wanted


def closure(requirements: tuple[str, ...] | list[str], python_version: str) -> dict[str, str]:
    """{distribution: installed version} of these requirements and everything they need, as installed here."""
    seen: dict[str, str] = {}
    expanded: set[tuple[str, frozenset[str]]] = set()  # (name, extras) already followed: cycles end
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name, extras = _name(req), frozenset(_extras(req))
        if (name, extras) in expanded:
            continue
        expanded.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise PrepareError(f"{name} is not installed here: prepare runs in the project's environment "
                               f"(bash infra/setup_env.sh)") from exc
        seen[name] = dist.version
        todo.extend(_requires(dist, set(extras), python_version))
    return seen


def carried_packages(python_version: str) -> dict[str, str]:
    """What the host lacks: the closure of CARRIED less that of HOST_PACKAGES."""
    host = closure(list(HOST_PACKAGES), python_version)
    return {n: v for n, v in sorted(closure(list(CARRIED), python_version).items()) if n not in host}


def download(packages: dict[str, str], python_version: str, into: Path) -> list[Path]:
    """Wheels of exactly these versions for the host's Python and manylinux x86-64, from the package index."""
    tag = python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3",
           "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(into),
           *[f"{n}=={v}" for n, v in packages.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PrepareError("pip download failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return sorted(into.glob("*.whl"))


def _kept(member: str) -> bool:
    return not (member.startswith(RAY_LEFT_OUT) or "/tests/" in member or member.startswith("ray/tests"))


def add_wheel(tar: tarfile.TarFile, wheel: Path) -> int:
    """A wheel's files as an installer would place them in site-packages (purelib/platlib out of .data)."""
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or not _kept(name):
                continue
            data_dir = re.match(r"[^/]+\.data/(purelib|platlib|scripts|headers|data)/(.*)", name)
            if data_dir:
                if data_dir.group(1) not in ("purelib", "platlib"):
                    continue  # console scripts and headers: the check runs modules, never `ray` the command
                name = data_dir.group(2)
            member = tarfile.TarInfo(name)
            payload = zf.read(info)
            member.size, member.mtime = len(payload), 0
            member.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644  # raylet, gcs_server stay executable
            tar.addfile(member, io.BytesIO(payload))
            count += 1
    return count


def travelling_size(extra: Path) -> int:
    """Bytes of what goes to the host: the tracked and untracked-not-ignored files of the checkout, and `extra`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    tree = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    inside = extra.resolve().is_relative_to(ROOT) and not _ignored(extra)
    return tree + (0 if inside else folder_size(extra))


def _ignored(path: Path) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare(folder: Path, python_version: str, xz_preset: int = 6) -> dict:
    packages = carried_packages(python_version)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eqface-gpu-host-") as tmp:
        wheels = download(packages, python_version, Path(tmp))
        staging = folder / (ARCHIVE + ".partial")
        tar_path = Path(tmp) / "site.tar"
        files = 0
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
            for wheel in wheels:
                files += add_wheel(tar, wheel)
        with open(staging, "wb") as out:
            if shutil.which("xz"):
                subprocess.run(["xz", f"-{xz_preset}", "-T2", "-c", str(tar_path)], stdout=out, check=True)
            else:  # no xz binary: the same format, one thread
                out.write(lzma.compress(tar_path.read_bytes(), preset=xz_preset))
        os.replace(staging, folder / ARCHIVE)  # a failed run leaves no half archive under the real name
    archive = folder / ARCHIVE
    manifest = {"python": python_version, "packages": packages, "wheels": [w.name for w in wheels], "files": files,
                "archive_bytes": archive.stat().st_size,
                "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "left_out": list(RAY_LEFT_OUT)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


# -- on the host --------------------------------------------------------------------------------------------------
def unpack(folder: Path, site: Path) -> dict:
    """Checks the archive against its manifest and the running Python, then extracts it into `site` (replaced)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != running:
        raise PrepareError(f"{folder / MANIFEST}: built for Python {manifest['python']}, this is {running}: "
                           f"prepare it again with --python-version {running}")
    data = (folder / ARCHIVE).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["archive_sha256"]:
        raise PrepareError(f"{folder / ARCHIVE}: sha256 differs from {MANIFEST}: copied incompletely?")
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        tar.extractall(site, filter="tar")
    return manifest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the travelling folder here, from the package index")
    p.add_argument("folder", type=Path)
    p.add_argument("--python-version", default="3.12", help="the host's Python (default: 3.12)")
    p.add_argument("--xz-preset", type=int, default=6, choices=range(10), help="6: 31 MB for Ray; 1: 4x faster")
    u = sub.add_parser("unpack", help="on the host: extract the archive into SITE (stdlib only)")
    u.add_argument("folder", type=Path)
    u.add_argument("site", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            manifest = unpack(args.folder, args.site)
            print(f"[gpu-host] unpacked {manifest['files']:,} files of {len(manifest['packages'])} packages "
                  f"into {args.site}", flush=True)
            return 0
        manifest = prepare(args.folder, args.python_version, args.xz_preset)
        size, travel = folder_size(args.folder), travelling_size(args.folder)
        command = host_command(os.path.relpath(args.folder.resolve(), ROOT)
                               if args.folder.resolve().is_relative_to(ROOT) else str(args.folder))
        print(f"[gpu-host] {args.folder}: {size / 2**20:.1f} MiB ({len(manifest['packages'])} packages for "
              f"Python {args.python_version}: {', '.join(f'{n} {v}' for n, v in manifest['packages'].items())})")
        print(f"[gpu-host] travels with the working tree: {travel / 2**20:.1f} MiB in all (limit "
              f"{TRAVEL_LIMIT / 2**20:.0f} MiB)")
        if size > FOLDER_LIMIT:
            raise PrepareError(f"{args.folder}: {size / 2**20:.1f} MiB, over the {FOLDER_LIMIT / 2**20:.0f} MiB limit")
        if travel > TRAVEL_LIMIT:
            raise PrepareError(f"the working tree and {args.folder} come to {travel / 2**20:.1f} MiB, over "
                               f"{TRAVEL_LIMIT / 2**20:.0f} MiB: remove untracked files or build the folder elsewhere")
        if len(command) > COMMAND_LIMIT:
            raise PrepareError(f"the host command is {len(command)} characters, over {COMMAND_LIMIT}")
        print(f"[gpu-host] on the host, from the repository root ({len(command)} characters):\n{command}")
        return 0
    except (PrepareError, OSError, subprocess.CalledProcessError, json.JSONDecodeError, tarfile.TarError) as exc:
        print(f"gpu_host: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
