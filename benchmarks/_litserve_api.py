"""The LitServe arm of the serving benchmark (benchmarks/serving.py): LitServe 0.2.19 batching
up to 32 requests with a 5 ms wait, one inference worker on the CPU, the same engine and request
decoding as Tandem's replicas (ONNX Runtime, one intra-op thread, parse_predict).

Run in its own process by benchmarks/_serving_arms.litserve_server (the `bench` extra installs
LitServe: `pip install -c constraints.txt -e ".[bench]"`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

from benchmarks._serving_arms import BATCH_WAIT_S, MAX_BATCH, MAX_INPUTS


class OnnxPredictAPI(ls.LitAPI):
    """POST /v1/predict with Tandem's JSON body, one example per request (as the benchmark sends);
    answers {"predictions": [class]}.

    LitServe calls predict in its inference worker, a process it spawns itself: the batch counters
    go to a 3-float file (batches, examples, forward seconds) the benchmark reads, mapped here so
    that counting costs a few stores per batch and no endpoint is needed."""

    def __init__(self, artifact: str, counters_file: str):
        super().__init__(max_batch_size=MAX_BATCH, batch_timeout=BATCH_WAIT_S, api_path="/v1/predict")
        self.artifact, self.counters_file = artifact, counters_file

    def setup(self, device: str) -> None:
        from serving.engines import load_engine

        self.engine = load_engine(Path(self.artifact), engine="onnxruntime", threads=1, device="cpu")
        self.counters = np.memmap(self.counters_file, dtype=np.float64, mode="r+", shape=(3,))

    def decode_request(self, request):  # no annotation: LitServe then hands over the parsed JSON body
        from serving.protocol import parse_predict

        return parse_predict(request, self.engine.input_shape, MAX_INPUTS)[0]

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        logits = self.engine.predict(x)
        self.counters += (1.0, float(len(x)), time.perf_counter() - start)
        return logits

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"predictions": [int(output.argmax())]}


def run(artifact: str, port: int, counters_file: str) -> None:
    server = ls.LitServer(OnnxPredictAPI(artifact, counters_file), accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning", access_log=False)
