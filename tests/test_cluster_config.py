"""ray_cluster.yaml, the training image and the MS1MV3 config: what can be proven without AWS or a GPU.

- the cluster file validates against the JSON schema shipped inside the `ray` package, and passes Ray's own
  prepare_config + validate_config (the checks `ray up` runs before touching AWS);
- it holds no credential, opens no Ray or MLflow port to any address range, keeps token auth on, and has
  GPU node types;
- its security group admits the group itself only, on Ray's fixed ports (GCS, raylet, dashboard agent, a fixed
  worker port range pinned on every `ray start`), and those rules apply as written to an EC2 API (moto's), where
  Ray's launcher then leaves them alone;
- its setup commands really fetch Secrets Manager secrets (the local moto server's) into ~/.ray/auth_token and
  ~/.mlflow/credentials with mode 600, and MLflow's client reads the latter;
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
GROUP = "eqface-ray"
# The flags of every `ray start` that fix the ports other nodes connect to (what the security group admits).
FIXED_PORT_FLAGS = ("--object-manager-port", "--node-manager-port", "--dashboard-agent-grpc-port",
                    "--dashboard-agent-listen-port", "--min-worker-port", "--max-worker-port")


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


def _flags(command: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(--[a-z-]+)=(\d+)\b", command)}


def _admits_only_the_group(rule: dict) -> bool:
    pairs = rule.get("UserIdGroupPairs", [])
    return (bool(pairs) and all(p.get("GroupName") == GROUP for p in pairs)
            and not any(rule.get(k) for k in ("IpRanges", "Ipv6Ranges", "PrefixListIds")))


def test_ray_ports_admit_the_clusters_own_group_only_with_a_fixed_worker_range(cluster):
    starts = [c for c in start_commands(cluster) if "ray start" in c]
    flags = [_flags(c) for c in starts]
    for command, found in zip(starts, flags, strict=True):
        assert set(FIXED_PORT_FLAGS) <= set(found), command  # nothing left to Ray's random choice
    assert all({k: f[k] for k in FIXED_PORT_FLAGS} == {k: flags[0][k] for k in FIXED_PORT_FLAGS} for f in flags)
    fixed = flags[0]
    workers = range(fixed["--min-worker-port"], fixed["--max-worker-port"] + 1)
    assert 100 <= len(workers) <= 2000, "a fixed, bounded worker port range"
    head_gcs = _flags(" ".join(cluster["head_start_ray_commands"]))["--port"]
    ports = {"GCS": head_gcs, "object manager": fixed["--object-manager-port"],
             "node manager": fixed["--node-manager-port"], "agent gRPC": fixed["--dashboard-agent-grpc-port"],
             "agent HTTP": fixed["--dashboard-agent-listen-port"], "first worker": workers[0],
             "last worker": workers[-1]}
    group = cluster["provider"]["security_group"]
    assert group["GroupName"] == GROUP
    rules = group["IpPermissions"]
    for what, port in ports.items():
        covering = [r for r in rules if _rule_covers(r, port)]
        assert covering and all(_admits_only_the_group(r) for r in covering), f"{what} ({port}): {covering}"
    assert any(int(r["FromPort"]) == workers[0] and int(r["ToPort"]) == workers[-1] for r in rules)
    # No rule of the file has an address range or opens everything: SSH from the operator's network is added
    # when the group is created (infra.security_group --ssh-from), never written here.
    assert all(_admits_only_the_group(r) and str(r["IpProtocol"]) == "tcp" for r in rules), rules
    for port in (8265, 10001, MLFLOW_PORT):  # dashboard, Ray Client, MLflow: through SSH only
        assert not any(_rule_covers(r, port) for r in rules), port


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
# Against AWS APIs: the local moto server (Secrets Manager, EC2)


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """The local moto server, and clients of it."""
    import boto3

    from infra.stack import Stack

    stack = Stack.load(tmp_path_factory.mktemp("moto"))
    try:
        stack.start_s3(buckets=("eqface",))
        env = stack.env()  # AWS_ENDPOINT_URL -> moto, which also serves Secrets Manager and EC2
        keys = {"region_name": "us-east-1", "endpoint_url": env["AWS_ENDPOINT_URL"],
                "aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
        yield {"env": env, "client": lambda name: boto3.client(name, **keys),
               "resource": lambda name: boto3.resource(name, **keys)}
    finally:
        stack.stop_all()


@pytest.mark.integration
def test_setup_commands_fetch_the_ray_token_and_mlflow_user_from_secrets_manager(cluster, aws, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env.update(aws["env"])
    venv_bin = Path(sys.executable).parent  # `python` of the setup command: one with boto3
    env.update(HOME=str(tmp_path / "home"), PATH=f"{venv_bin}{os.pathsep}{env['PATH']}")
    (tmp_path / "home").mkdir()
    secrets = aws["client"]("secretsmanager")
    token = "a" * 16 + "0123456789abcdef" * 3
    password = "trainer-%-" + "0123456789abcdef" * 2  # '%' must survive the credentials file's ini syntax
    secrets.create_secret(Name="eqface/ray-auth-token", SecretString=token + "\n")
    secrets.create_secret(Name="eqface/mlflow-trainer",
                          SecretString=json.dumps({"username": "trainer", "password": password}))
    for _ in range(2):  # `ray up` re-runs setup commands on every update: they must be idempotent
        for command in cluster["setup_commands"]:
            done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{command}\n{done.stderr}"
            for secret in (token, password):  # never echoed into the launcher's logs
                assert secret not in done.stdout + done.stderr
    token_file = tmp_path / "home" / ".ray" / "auth_token"
    assert token_file.read_text().strip() == token
    credentials = tmp_path / "home" / ".mlflow" / "credentials"
    for secret_file in (token_file, credentials):
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert (tmp_path / "home" / ".bashrc").read_text().count("export RAY_AUTH_MODE=token") == 1
    read = "from mlflow.utils.credentials import read_mlflow_creds as r; c = r(); print(c.username); print(c.password)"
    done = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["trainer", password], done.stderr[-2000:]


@pytest.mark.integration
def test_security_group_rules_apply_to_ec2_and_the_launcher_keeps_them(cluster, aws):
    """The rules of ray_cluster.yaml, through infra.security_group, on a group of a VPC of moto's EC2: each admits
    the group itself (by id) on the same ports. Ray's launcher (its own function for a group it finds) then leaves
    the group as it is; a group without rules would get its defaults, SSH from 0.0.0.0/0 among them."""
    from ray.autoscaler._private.aws.config import _upsert_security_group_rules

    from infra.security_group import ingress_rules

    ec2 = aws["client"]("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    group_id = ec2.create_security_group(GroupName=GROUP, Description="EQFace Ray", VpcId=vpc)["GroupId"]
    rules = ingress_rules(cluster, group_id, ssh_from=["203.0.113.0/24"])
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=rules)

    def ingress(gid: str) -> set[tuple]:
        """(protocol, from, to, source) per source: EC2 merges sources of one port range into one rule."""
        group = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"][0]
        return {(r["IpProtocol"], r.get("FromPort"), r.get("ToPort"), source) for r in group["IpPermissions"]
                for source in [p["GroupId"] for p in r.get("UserIdGroupPairs", [])]
                + [c["CidrIp"] for c in r.get("IpRanges", [])]}

    applied = ingress(group_id)
    wanted = {("tcp", r["FromPort"], r["ToPort"], group_id) for r in cluster["provider"]["security_group"]
              ["IpPermissions"]}
    assert applied == wanted | {("tcp", 22, 22, "203.0.113.0/24")}
    config = copy.deepcopy(cluster)
    ec2_resource = aws["resource"]("ec2")
    _upsert_security_group_rules(config, {"head.cpu": ec2_resource.SecurityGroup(group_id)})
    assert ingress(group_id) == applied
    bare = ec2.create_security_group(GroupName="bare", Description="no rules", VpcId=vpc)["GroupId"]
    _upsert_security_group_rules(config, {"head.cpu": ec2_resource.SecurityGroup(bare)})
    assert ("tcp", 22, 22, "0.0.0.0/0") in ingress(bare)


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
