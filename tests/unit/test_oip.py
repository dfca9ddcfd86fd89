"""The Open Inference Protocol's decoding and encoding, without Ray or HTTP (serving/oip.py).

Requests are built by tritonclient itself (its request builder is what goes on the wire), so the
decoder is held to the real client, not to our reading of the spec."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from serving.oip import INPUT, InferRequest, infer_response, output_arrays, parse_infer
from serving.protocol import RequestError, softmax

SHAPE = (64,)


def triton_request(x: np.ndarray, binary: bool, outputs: list[tuple[str, bool]] | None = None) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) exactly as tritonclient.http sends them."""
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http._utils import _get_inference_request

    tensor = InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    requested = [InferRequestedOutput(name, binary_data=b) for name, b in outputs] if outputs else None
    body, json_size = _get_inference_request([tensor], "req-1", requested, 0, False, False, 0, None, None)
    return body, (str(json_size) if json_size is not None else None)


def refused(body: bytes, header: str | None = None, max_inputs: int = 8) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_infer(body, header, SHAPE, max_inputs)
    return caught.value


def test_json_and_binary_requests_from_tritonclient_decode_to_the_same_batch():
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    for binary in (False, True):
        body, header = triton_request(x, binary)
        parsed = parse_infer(body, header, SHAPE, 8)
        assert parsed.x.dtype == np.float32 and np.array_equal(parsed.x, x) and parsed.request_id == "req-1"
        # No outputs named: every output, binary (tritonclient asks with binary_data_output).
        assert parsed.outputs == {"logits": True, "predictions": True, "probabilities": True}


def test_the_response_is_what_tritonclient_reads_back():
    from tritonclient.http import InferResult

    logits = np.random.default_rng(1).normal(size=(3, 10)).astype(np.float32)
    request = InferRequest(
        x=np.zeros((3, 64), np.float32), request_id="r", outputs={"logits": True, "predictions": False, "probabilities": True}
    )
    body, header_length = infer_response("digits", "abc", request, output_arrays(logits, softmax(logits)))
    result = InferResult.from_response_body(body, header_length=header_length)
    assert np.array_equal(result.as_numpy("logits"), logits)
    assert result.as_numpy("predictions").tolist() == logits.argmax(1).tolist()
    assert np.allclose(result.as_numpy("probabilities"), softmax(logits))
    assert result.get_response()["model_version"] == "abc" and result.get_response()["id"] == "r"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: r["inputs"][0].update(datatype="BYTES"), "datatype 'BYTES'"),
        (lambda r: r["inputs"][0].update(shape=[2, 64]), 'has 64 values in "data" but shape'),
        (lambda r: r["inputs"][0].update(shape=[1, 63]), r"expected \[N, 64\]"),
        (lambda r: r["inputs"][0].update(name="x"), "unknown: \\['x'\\]"),
        (lambda r: r.update(inputs=[]), "exactly one tensor"),
        (lambda r: r.update(outputs=[{"name": "embedding"}]), "unknown output 'embedding'"),
        (lambda r: r["inputs"][0].update(data=["a"] * 64), '"data" must be numbers'),
        (lambda r: r["inputs"][0].update(data=[float("nan")] * 64), "NaN or infinity"),
    ],
)
def test_every_malformed_json_request_is_a_400_naming_the_part(change, match):
    request = {"inputs": [{"name": INPUT, "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    change(request)
    error = refused(json.dumps(request).encode())
    assert error.status == 400 and error.code == "bad_request"
    assert re.search(match, error.message), error.message


def test_binary_data_that_does_not_match_its_declaration_is_refused():
    x = np.ones((2, 64), np.float32)
    body, header = triton_request(x, binary=True)
    head = body[: int(header)]
    assert "declares 512 bytes of binary data but the body holds 508" in refused(body[:-4], header).message
    assert "the inputs declare 512" in refused(body + b"\0\0\0\0", header).message
    assert "the body has" in refused(body, str(len(body) + 1)).message  # a header length past the body
    assert "must be a byte count" in refused(body, "ten").message
    short = head.replace(b'"binary_data_size":512', b'"binary_data_size":256')
    assert "takes 512" in refused(short + body[int(header) :], str(len(short))).message


def test_too_many_examples_is_a_413():
    body, header = triton_request(np.ones((9, 64), np.float32), binary=True)
    error = refused(body, header, max_inputs=8)
    assert error.status == 413 and "serving.limits.max_inputs" in error.message
