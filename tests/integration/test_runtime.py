"""Connecting to Ray: a simulated multi-node cluster really has one node per group with its resource."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.runtime import NODE_GROUP_CAPACITY, connect, node_group_resource

pytestmark = pytest.mark.integration


def test_simulate_nodes_gives_one_ray_node_per_group_replica():
    import ray

    if ray.is_initialized():
        pytest.skip("a session Ray is already running in this process; run this module on its own to simulate nodes")
    cfg = load_config(None, [
        "cluster.local.simulate_nodes=true",
        "cluster.node_groups={gpu: {cpus: 1, replicas: 1, min_replicas: 0, max_replicas: 2}, cpu: {cpus: 1, replicas: 2, max_replicas: 2}}",
    ])
    with connect(cfg) as handle:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 1 + 3  # head + gpu x1 + cpu x2
        for group, count in (("gpu", 1), ("cpu", 2)):
            members = [n for n in alive if n["Resources"].get(node_group_resource(group)) == NODE_GROUP_CAPACITY]
            assert len(members) == count
            assert sorted(n["NodeID"] for n in members) == sorted(handle.nodes[group])
    assert not ray.is_initialized()
