"""Connecting to Ray: a simulated multi-node cluster really has one node per group with its
resource, `tandem predict`'s pools land on their group's nodes there, and training workers
placed `strict_spread` on a group land on different nodes of it (one simulated cluster for all)."""

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
    import json, sys
    from pathlib import Path
    import numpy as np, ray
    from cluster.config import config_with, load_config
    from cluster.runtime import NODE_GROUP_CAPACITY, connect, node_group_resource
    from serving.offline import predict

    storage, artifact, scratch = sys.argv[1:4]
    pool = "cpus: 0.5, autoscaling: {min_replicas: 1, max_replicas: 1}"
    cfg = load_config(None, [
        f"cluster.storage={storage}",
        "cluster.local.simulate_nodes=true",
        "cluster.node_groups={gpu: {cpus: 1, replicas: 1, min_replicas: 0, max_replicas: 2}, cpu: {cpus: 1, replicas: 2, max_replicas: 2}}",
        # The gpu group's pool runs torch, the cpu group's ONNX int8 (simulated nodes have no GPU).
        f"serving.deployments=[{{name: gpu, engine: torch, node_group: gpu, {pool}}},"
        f" {{name: cpu, engine: onnxruntime, quantize: int8, node_group: cpu, {pool}}}]",
        "predict.chunk_rows=100",
    ])
    with connect(cfg) as handle:
        alive = [n for n in ray.nodes() if n["Alive"]]
        pinned = {g: node_group_resource(g) for g in ("gpu", "cpu")}
        members = {g: [n["NodeID"] for n in alive if n["Resources"].get(name) == NODE_GROUP_CAPACITY] for g, name in pinned.items()}
        groups = {g: sorted(ids) for g, ids in members.items()}
        print(json.dumps({"alive": len(alive), "groups": groups, "handle": {g: sorted(v) for g, v in handle.nodes.items()}}))
        np.save(Path(scratch) / "rows.npy", np.random.default_rng(5).random((400, 64), dtype=np.float32))
        summary = predict(cfg, str(Path(scratch) / "rows.npy"), Path(scratch) / "out", source=artifact)
        print(json.dumps({"rows": summary.rows, "actors": {a: s["node"] for a, s in summary.per_actor.items()}}))
        from training.trainer import train
        spread = config_with(cfg, {"training.epochs": 1, "model.args.hidden": [32], "training.workers": 2,
                                   "training.placement": "strict_spread", "training.node_group": "cpu",
                                   "cluster.storage": str(Path(scratch) / "runs")})  # not the shared artifact's
        trained = train(spread)
        print(json.dumps({"train_nodes": trained.history[-1]["node_ids"]}))
    print(json.dumps({"still_initialized": ray.is_initialized()}))
    """
)


@pytest.mark.slow
def test_simulated_nodes_one_per_group_replica_where_predict_pools_and_spread_workers_land_on_their_group(shared_artifact, tmp_path):
    storage, artifact = shared_artifact
    cmd = [sys.executable, "-c", SCRIPT, str(storage), str(artifact), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    nodes, predicted, trained, after = lines
    assert nodes["alive"] == 1 + 3  # head + gpu x1 + cpu x2
    assert len(nodes["groups"]["gpu"]) == 1 and len(nodes["groups"]["cpu"]) == 2
    assert nodes["groups"] == nodes["handle"]
    # Every actor of each pool ran on a node of its own group (its name is "pool@host:pid").
    assert predicted["rows"] == 400
    pools = {actor.split("@")[0] for actor in predicted["actors"]}
    assert pools == {"gpu", "cpu"}, predicted
    for actor, node in predicted["actors"].items():
        assert node in nodes["groups"][actor.split("@")[0]], (actor, node, nodes["groups"])
    # The two training workers, strict_spread on the cpu group: one on each of its nodes.
    assert sorted(trained["train_nodes"]) == nodes["groups"]["cpu"], (trained, nodes["groups"])
    assert after["still_initialized"] is False
