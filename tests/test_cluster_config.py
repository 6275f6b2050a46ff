"""ray_cluster.yaml, the training image and the MS1MV3 config: what can be proven without AWS or a GPU.

- the cluster file validates against the JSON schema shipped inside the `ray` package, and passes Ray's own
  prepare_config + validate_config (the checks `ray up` runs before touching AWS);
- it holds no credential, opens no Ray or MLflow port to any address range, keeps token auth on, and has
  GPU node types;
- its token setup command really fetches a Secrets Manager secret (the local moto server's) into
  ~/.ray/auth_token with mode 600;
- the job upload, packed by Ray's own packager with the documented excludes, carries code and no data;
- the Dockerfile, ray_cluster.yaml and pyproject.toml agree; configs/ms1mv3_r100.yaml loads and fits the
  cluster.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from infra.ray_private import create_package, prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ray_cluster.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCS = ROOT / "docs" / "cluster.md"
RAY_PORTS = (6379, 8076, 8265, 10001)  # GCS, object manager, dashboard/jobs API, Ray client
MLFLOW_PORT = 5000
PUBLIC = {"0.0.0.0/0", "::/0"}


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def schema_errors(config: dict) -> list[str]:
    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = validator.iter_errors(config)
    return sorted(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors)


def start_commands(cluster: dict) -> list[str]:
    return cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]


# ---------------------------------------------------------------------------------------------
# Ray's schema and Ray's own checks


def test_cluster_file_validates_against_rays_schema(cluster):
    assert schema_errors(cluster) == []


def test_schema_check_catches_a_misspelt_key(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu.8x.train"]["max_worker"] = 2  # not a key of the schema
    broken["docker"]["imag"] = broken["docker"]["image"]
    errors = schema_errors(broken)
    assert len(errors) == 2
    assert any("max_worker" in e for e in errors) and any("imag" in e for e in errors)


def test_ray_prepare_and_validate_config_accept_it(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))  # merges Ray's AWS defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] == "head.cpu"
    # Ray merged the common setup commands into the head's and the workers'.
    assert any("secretsmanager" in c for c in prepared["head_setup_commands"])
    assert any("secretsmanager" in c for c in prepared["worker_setup_commands"])


# ---------------------------------------------------------------------------------------------
# Security


def test_no_credentials_in_the_cluster_file(cluster):
    text = CLUSTER.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "PRIVATE KEY"):
        assert word.lower() not in text.lower(), word
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text), "a Ray token written into a command"
    assert not re.search(r"\b[0-9a-f]{48,}\b", text), "a long hex secret"
    assert "ssh_private_key" not in cluster["auth"]
    for name, node_type in cluster["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: no instance profile for S3 access"
        imds = node_type["node_config"]["MetadataOptions"]
        assert imds["HttpTokens"] == "required", f"{name}: IMDSv1 allowed"


def _rule_covers(rule: dict, port: int) -> bool:
    if str(rule.get("IpProtocol")) == "-1":
        return True
    return int(rule.get("FromPort", -1)) <= port <= int(rule.get("ToPort", -1))


def _public_ranges(rule: dict) -> set[str]:
    v4 = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
    v6 = {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
    return (v4 | v6) & PUBLIC


def test_no_ray_or_mlflow_port_open_to_the_internet(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        for port in (*RAY_PORTS, MLFLOW_PORT):
            assert not (_rule_covers(rule, port) and _public_ranges(rule)), f"port {port} open to {rule}"
    # No pre-made group that the test cannot see: Ray creates `eqface-ray` with intra-cluster + SSH only.
    for name, node_type in cluster["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], name
    # The dashboard (jobs API) listens on the head's loopback: reached through `ray dashboard` (SSH).
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_rule_check_would_catch_an_open_dashboard():
    anywhere = [{"CidrIp": "0.0.0.0/0"}]
    open_dashboard = {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": anywhere}
    assert _rule_covers(open_dashboard, 8265) and _public_ranges(open_dashboard) == {"0.0.0.0/0"}
    ssh_only = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": anywhere}
    assert not any(_rule_covers(ssh_only, port) for port in (*RAY_PORTS, MLFLOW_PORT))


def test_every_ray_start_uses_token_auth(cluster):
    starts = [c for c in start_commands(cluster) if "ray start" in c]
    assert len(starts) == 2  # head and workers
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command, command
        assert "--disable-usage-stats" in command


# ---------------------------------------------------------------------------------------------
# Node types


def test_cpu_head_and_gpu_worker_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # the head trains nothing
    assert "--num-cpus=0" in " ".join(cluster["head_start_ray_commands"])
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    expected = {"g5.xlarge": (4, 1), "p4d.24xlarge": (96, 8)}  # vCPUs, GPUs of the instance type
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == set(expected)
    for name, node_type in gpu_types.items():
        cpus, gpus = expected[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"] == {"CPU": cpus, "GPU": gpus}, name
        assert node_type["min_workers"] == 0 < node_type["max_workers"], name  # GPUs only on demand
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert cluster["max_workers"] <= sum(t["max_workers"] for t in gpu_types.values())


# ---------------------------------------------------------------------------------------------
# The token setup command against a Secrets Manager API (the local moto server)


def test_setup_commands_fetch_the_ray_token_from_secrets_manager(cluster, tmp_path):
    import boto3

    from infra.stack import Stack

    stack = Stack.load(tmp_path / "state")
    try:
        stack.start_s3(buckets=("eqface",))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(stack.env())  # AWS_ENDPOINT_URL -> moto, which also serves Secrets Manager
        venv_bin = Path(sys.executable).parent  # `python` of the setup command: one with boto3
        env.update(HOME=str(tmp_path / "home"), PATH=f"{venv_bin}{os.pathsep}{env['PATH']}")
        (tmp_path / "home").mkdir()
        secrets = boto3.client(
            "secretsmanager", region_name="us-east-1", endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        token = "a" * 16 + "0123456789abcdef" * 3
        secrets.create_secret(Name="eqface/ray-auth-token", SecretString=token + "\n")
        for _ in range(2):  # `ray up` re-runs setup commands on every update: they must be idempotent
            for command in cluster["setup_commands"]:
                done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                                      timeout=120)
                assert done.returncode == 0, f"{command}\n{done.stderr}"
                assert token not in done.stdout + done.stderr  # never echoed into the launcher's logs
    finally:
        stack.stop_all()
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert (tmp_path / "home" / ".bashrc").read_text().count("export RAY_AUTH_MODE=token") == 1


# ---------------------------------------------------------------------------------------------
# What a job uploads


def _packed(directory: Path, excludes: list[str], out: Path) -> set[str]:
    create_package(str(directory), out, include_gitignore=True, excludes=excludes)
    return set(zipfile.ZipFile(out).namelist())


def test_job_upload_carries_code_and_no_data(cluster, tmp_path):
    repo = tmp_path / "repo"
    files = {
        "flows/eqface.py": "print('flow')\n", "data/shards.py": "# the data *package* is code\n",
        "configs/default.yaml": "flow: {}\n", "datasets/ms1mv3/part-0.parquet": "x", "faces/train.rec": "x",
        "faces/train.idx": "x", "train.lst": "x", "mlruns/0/meta.yaml": "x", "mlartifacts/1/a.png": "x",
        "outputs/plot.png": "x", "backup.tar.gz": "x", ".stack/stack.json": "{}", ".git/HEAD": "x",
        "secrets.env": "x",
    }
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content)
    (repo / ".gitignore").write_text("secrets.env\n")
    packed = _packed(repo, cluster["rsync_exclude"], tmp_path / "pkg.zip")
    code = {"flows/eqface.py", "data/shards.py", "configs/default.yaml"}
    assert code <= packed
    assert packed.isdisjoint(set(files) - code), packed


def test_the_repository_upload_is_small(cluster, tmp_path):
    packed = _packed(ROOT, cluster["rsync_exclude"], tmp_path / "repo.zip")
    size_mib = (tmp_path / "repo.zip").stat().st_size / 2**20
    assert "flows/eqface.py" in packed and "configs/ms1mv3_r100.yaml" in packed
    assert not any(name.startswith((".venv/", ".git/", ".stack/")) for name in packed)
    assert size_mib < 20, f"the job upload is {size_mib:.1f} MiB: data or environments in the repository?"


def test_documented_submit_command_uses_the_same_excludes(cluster):
    match = re.search(r"--runtime-env-json '(\{.*?\})'", DOCS.read_text())
    assert match, "docs/cluster.md: no ray job submit --runtime-env-json '...'"
    runtime_env = json.loads(match.group(1))
    assert runtime_env["excludes"] == cluster["rsync_exclude"]
    assert set(runtime_env["env_vars"]) == {"MLFLOW_TRACKING_URI"}  # no credential handed to the job


# ---------------------------------------------------------------------------------------------
# Image and config agree with the rest


def test_image_matches_pyproject_and_cluster(cluster):
    pyproject = (ROOT / "pyproject.toml").read_text()  # (no tomllib: the project supports Python 3.10)
    torch_version = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG TORCH_VERSION={torch_version}" in dockerfile
    repository, tag = cluster["docker"]["image"].rsplit("/", 1)[1].split(":")
    assert (repository, tag) == ("eqface-train", version)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # Dependencies from pyproject.toml, then the empty distribution removed: no repo code in site-packages.
    assert "pip uninstall --yes eqface-ray" in dockerfile and "COPY pyproject.toml" in dockerfile
    # The launcher's login shells reset PATH from /etc/profile: the venv must come back from profile.d.
    assert re.search(r"export PATH=/opt/venv/bin:\$PATH' > /etc/profile\.d/", dockerfile)


def test_ms1mv3_config_loads_and_fits_the_cluster(cluster):
    from flows.config import load_config

    cfg = load_config([ROOT / "configs" / "default.yaml", ROOT / "configs" / "ms1mv3_r100.yaml"])
    assert (cfg.model.backbone, cfg.data.image_size, cfg.model.embedding_size) == ("r100", 112, 512)
    assert (cfg.loss.scale, cfg.loss.m2, cfg.model.head) == (64.0, 0.5, "sharded")
    assert (cfg.scaling.amp, cfg.scaling.use_gpu) == ("bf16", True)
    assert cfg.step1.batch_size == cfg.step2.batch_size == cfg.step3.batch_size == 128
    assert cfg.data.skip_corrupt
    for uri in (cfg.flow.storage, cfg.data.train, cfg.data.val):
        assert uri.startswith("s3://"), uri
    biggest = max(cluster["available_node_types"].values(), key=lambda t: t["resources"].get("GPU", 0))
    gpus, cpus = biggest["resources"]["GPU"], biggest["resources"]["CPU"]
    assert cfg.scaling.num_workers <= gpus * biggest["max_workers"]
    # Workers on one node leave CPUs to Ray Data's decoding tasks.
    assert min(cfg.scaling.num_workers, gpus) * cfg.scaling.cpus_per_worker <= cpus / 2
