"""Connecting to Ray: a simulated multi-node cluster really has one node per group with its
resource, `tandem predict`'s pools land on their group's nodes there, and training workers
placed `strict_spread` on a group land on different nodes of it (one simulated cluster for all).

The run state is in an S3 bucket (moto's server, tests/conftest.py `s3_store`) and each simulated
node has an artifact cache of its own, so the nodes share nothing but the bucket: the artifact,
predict's output and the spread workers' checkpoints all go through it."""

from __future__ import annotations

import json
import os
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
    from cluster.storage import location, publish_folder
    from serving.offline import predict

    local_artifact, storage, scratch = sys.argv[1:4]
    artifact = f"{storage}/digits/run-1/artifacts"
    publish_folder(Path(local_artifact), location(artifact))
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
        summary = predict(cfg, str(Path(scratch) / "rows.npy"), f"{storage}-predictions", source=artifact)
        print(json.dumps({"rows": summary.rows, "actors": {a: s["node"] for a, s in summary.per_actor.items()}}))
        from training.trainer import train
        spread = config_with(cfg, {"training.epochs": 1, "model.args.hidden": [32], "training.workers": 2,
                                   "training.placement": "strict_spread", "training.node_group": "cpu",
                                   "cluster.storage": f"{storage}/spread"})  # not the shared artifact's
        trained = train(spread)
        print(json.dumps({"train_nodes": trained.history[-1]["node_ids"], "artifact": str(trained.artifact_dir)}))
    print(json.dumps({"still_initialized": ray.is_initialized()}))
    """
)


@pytest.mark.slow
def test_simulated_nodes_one_per_group_replica_where_predict_pools_and_spread_workers_land_on_their_group(
    shared_artifact, s3_store, tmp_path
):
    _, artifact = shared_artifact
    storage = f"s3://{s3_store.bucket}/simulated-{tmp_path.name}"
    cache = tmp_path / "cache"  # the driver's; each simulated node's under simulated-nodes/
    cmd = [sys.executable, "-c", SCRIPT, str(artifact), storage, str(tmp_path)]
    env = {**os.environ, **s3_store.env, "TANDEM_CACHE_DIR": str(cache)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
    # Through the bucket: the workers on two nodes wrote one artifact, predict its output, and
    # each node that ran a pool's actor fetched that engine's file into its own cache, once.
    prefix = storage.removeprefix(f"s3://{s3_store.bucket}/")
    assert trained["artifact"].startswith(f"{storage}/spread/digits/"), trained
    assert f"{prefix}-predictions/summary.json" in s3_store.keys(f"{prefix}-predictions/")
    fetched = {}
    for log in (cache / "simulated-nodes").glob("*/downloads.jsonl"):
        uris = [json.loads(line)["uri"] for line in log.read_text().splitlines()]
        assert len(uris) == len(set(uris)), (log, uris)
        fetched[log.parent.name] = {u.rsplit("/", 1)[1] for u in uris}
    assert fetched.get("gpu-0", set()) >= {"model.pt"}, fetched  # the torch pool
    assert any("model.int8.onnx" in files for node, files in fetched.items() if node.startswith("cpu-")), fetched
