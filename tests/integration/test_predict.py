"""`tandem predict` on the session's Ray: Ray Data actor pools, one per serving deployment, each
row's prediction equal to its pool's engine on that row, bad rows set aside with their reason."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from serving.engines import load_engine
from serving.offline import ERRORS, PREDICTIONS, SUMMARY, PredictError, predict
from serving.protocol import softmax
from tests.integration.test_serving import digits_inputs, serving_config

pytestmark = pytest.mark.integration
NAME = "digits-predict"
POOLS = {
    "gpu": {"engine": "torch", "node_group": "gpu"},  # the torch pool, pinned to the gpu group
    "cpu": {"engine": "onnxruntime", "quantize": "int8", "node_group": "cpu"},
    "fp32": {"engine": "onnxruntime"},
}


@pytest.fixture(scope="module")
def artifact(shared_artifact):
    return shared_artifact


def config_for(storage, chunk_rows=100, **predict):
    deployments = [
        {"name": name, "cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}, **settings} for name, settings in POOLS.items()
    ]
    return serving_config(storage, NAME, {"deployments": deployments}, predict={"chunk_rows": chunk_rows, **predict})


def test_every_pool_predicts_like_its_engine_on_its_group_and_ids_line_up(ray_session, artifact, tmp_path):
    storage, folder = artifact
    x = digits_inputs(650, seed=3)
    np.save(tmp_path / "rows.npy", x)
    # 10-row chunks: about 22 per pool, so an actor's call runs several chunks through its
    # read-predict-write pipeline (serving/offline.py PredictChunks.__call__).
    config = config_for(storage, chunk_rows=10, probabilities=True)
    summary = predict(config, str(tmp_path / "rows.npy"), tmp_path / "out", source=str(folder))
    assert (summary.rows, summary.errors) == (650, 0)
    table = pq.read_table(tmp_path / "out" / PREDICTIONS).sort_by("id").to_pydict()
    assert table["id"] == list(range(650))  # one row out per row in, numbered as the input
    ids, answers = np.array(table["id"]), np.array(table["prediction"])
    for name, settings in POOLS.items():
        mine = np.array([d == name for d in table["deployment"]])
        assert mine.any(), f"pool {name} predicted no row"
        engine = load_engine(folder, engine=settings["engine"], quantize=settings.get("quantize", "none"), threads=1)
        # Chunk by chunk, as the actors ran them: dynamic int8 scales its activations per batch.
        chunks = sorted({int(i) // 10 for i in ids[mine]})
        logits = np.concatenate([engine.predict(x[c * 10 : c * 10 + 10]) for c in chunks])
        assert answers[mine].tolist() == logits.argmax(1).tolist(), name
        probabilities = np.array([p for p, m in zip(table["probabilities"], mine, strict=True) if m])
        np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-5)
    # Each pool's actors held their node group's resource (the Serve replicas' pinning).
    for actor, stats in summary.per_actor.items():
        group = POOLS[actor.split("@")[0]].get("node_group")
        held = {k for k in stats["resources"] if k.startswith("group_")}
        assert held == ({f"group_{group}"} if group else set()), (actor, stats["resources"])
    written = json.loads((tmp_path / "out" / SUMMARY).read_text())
    assert written["rows"] == 650 and written["model_version"] == summary.model_version


def test_bad_rows_are_set_aside_with_their_reason_and_an_all_bad_input_fails(ray_session, artifact, tmp_path):
    storage, folder = artifact
    x = digits_inputs(40, seed=4)
    with open(tmp_path / "mixed.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key"] + [f"p{i}" for i in range(64)])
        for i, row in enumerate(x):
            values = [f"k{i}"] + [str(v) for v in row]
            values = {3: values[:5], 7: values[:9] + ["abc"] + values[10:], 11: values[:2] + ["nan"] + values[3:]}.get(i, values)
            writer.writerow(values)
    config = config_for(storage, id_column="key")
    summary = predict(config, str(tmp_path / "mixed.csv"), tmp_path / "out", source=str(folder))
    assert (summary.rows, summary.errors) == (37, 3)
    errors = pq.read_table(tmp_path / "out" / ERRORS).sort_by("id").to_pydict()
    assert errors["id"] == ["k11", "k3", "k7"]
    assert errors["reason"] == [
        "column 'p1' holds nan",
        "5 fields, the header has 65",
        "value 'abc' in column 'p8' does not parse as a number",
    ]
    predicted = pq.read_table(tmp_path / "out" / PREDICTIONS).to_pydict()
    assert sorted(predicted["id"]) == sorted(f"k{i}" for i in range(40) if i not in (3, 7, 11))

    (tmp_path / "bad.jsonl").write_text('{"p0": "x"}\nnot json\n')
    with pytest.raises(PredictError, match="no row of .*bad.jsonl could be predicted \\(2 bad\\)"):
        predict(config, str(tmp_path / "bad.jsonl"), tmp_path / "out-bad", source=str(folder))
