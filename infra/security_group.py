"""The Ray cluster's security group rules, from ray_cluster.yaml, for the AWS CLI.

    SG=$(aws ec2 create-security-group --group-name eqface-ray --vpc-id VPC --description "EQFace Ray cluster" \
         --query GroupId --output text)
    aws ec2 authorize-security-group-ingress --group-id "$SG" \
        --ip-permissions "$(python -m infra.security_group ray_cluster.yaml "$SG" --ssh-from 203.0.113.0/24)"

ray_cluster.yaml names the group in its rules by GroupName (its id does not exist before the group does); a
group in a VPC is referred to by id, so the id is filled in here. SSH from the operator's network is the one
rule with an address range, and it is given here, not written in the repository.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml


def ingress_rules(cluster: dict, group_id: str, ssh_from: list[str]) -> list[dict]:
    """The cluster file's IpPermissions with the group's own name replaced by `group_id`, plus SSH (22) from
    each CIDR in `ssh_from`."""
    group = cluster["provider"]["security_group"]
    rules = copy.deepcopy(group.get("IpPermissions", []))
    for rule in rules:
        for pair in rule.get("UserIdGroupPairs", []):
            if pair.pop("GroupName", None) not in (None, group["GroupName"]):
                raise ValueError(f"rule {rule}: refers to a group other than the cluster's own")
            pair["GroupId"] = group_id
    if ssh_from:
        rules.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                      "IpRanges": [{"CidrIp": cidr, "Description": "SSH for ray up/attach"} for cidr in ssh_from]})
    return rules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.security_group", description=__doc__.splitlines()[0])
    parser.add_argument("cluster", type=Path, help="ray_cluster.yaml")
    parser.add_argument("group_id", help="the id of the group created for it (sg-...)")
    parser.add_argument("--ssh-from", action="append", default=[], metavar="CIDR",
                        help="the network `ray up` connects from (repeatable)")
    args = parser.parse_args(argv)
    print(json.dumps(ingress_rules(yaml.safe_load(args.cluster.read_text()), args.group_id, args.ssh_from)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
