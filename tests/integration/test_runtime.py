"""Connecting to Ray: a simulated multi-node cluster really has one node per group with its resource."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh process: simulated nodes need a Ray of their own, not the test session's.
SCRIPT = textwrap.dedent(
    """
    import json, ray
    from cluster.config import load_config
    from cluster.runtime import NODE_GROUP_CAPACITY, connect, node_group_resource

    cfg = load_config(None, [
        "cluster.local.simulate_nodes=true",
        "cluster.node_groups={gpu: {cpus: 1, replicas: 1, min_replicas: 0, max_replicas: 2}, cpu: {cpus: 1, replicas: 2, max_replicas: 2}}",
    ])
    with connect(cfg) as handle:
        alive = [n for n in ray.nodes() if n["Alive"]]
        pinned = {g: node_group_resource(g) for g in ("gpu", "cpu")}
        members = {g: [n["NodeID"] for n in alive if n["Resources"].get(name) == NODE_GROUP_CAPACITY] for g, name in pinned.items()}
        groups = {g: sorted(ids) for g, ids in members.items()}
        print(json.dumps({"alive": len(alive), "groups": groups, "handle": {g: sorted(v) for g, v in handle.nodes.items()}}))
    print(json.dumps({"still_initialized": ray.is_initialized()}))
    """
)


def test_simulate_nodes_gives_one_ray_node_per_group_replica():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    nodes, after = lines[0], lines[1]
    assert nodes["alive"] == 1 + 3  # head + gpu x1 + cpu x2
    assert len(nodes["groups"]["gpu"]) == 1 and len(nodes["groups"]["cpu"]) == 2
    assert nodes["groups"] == nodes["handle"]
    assert after["still_initialized"] is False
