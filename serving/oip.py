"""The Open Inference Protocol (KServe v2) over HTTP, with the binary tensor data extension.

Triton's, KServe's and Seldon's clients speak it (`tritonclient.http.InferenceServerClient` works
against Tandem unchanged). Pure functions over bytes and numpy arrays, like serving/protocol.py
for /v1: the app (serving/app.py) routes both protocols through the same batcher, cache and
admission gate.

    GET  /v2/health/live, /v2/health/ready          200 while the replica serves
    GET  /v2                                        server metadata (name, version, extensions)
    GET  /v2/models/{name}[/versions/{v}]           model metadata: one FP32 input [-1, *shape]
    GET  /v2/models/{name}[/versions/{v}]/ready     200 when name (and version) are served here
    POST /v2/models/{name}[/versions/{v}]/infer     one input tensor "input" -> "logits" (FP32
                                                    [N, classes]), "predictions" (INT64 [N]),
                                                    "probabilities" (FP32 [N, classes])

Binary tensor data: with the header `Inference-Header-Content-Length: H`, the first H bytes of
the body are the JSON request and the rest holds each input that declares
`"parameters": {"binary_data_size": n}`, in order, as raw little-endian values. An output asked
for with `"parameters": {"binary_data": true}` (or every output, with the request parameter
`binary_data_output: true`) comes back the same way after the JSON response, whose length the
response's own Inference-Header-Content-Length says. For many examples per request this skips
JSON's text encoding of every number.

Errors are the protocol's body `{"error": "<what is wrong and the fix>"}`: 400 for a malformed
request (wrong datatype, shape that does not match the data, unknown input or output name, binary
data shorter or longer than declared, a header length past the body), 404 for an unknown model
or version, 401/413/503 as on /v1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.protocol import RequestError, parse_json

INPUT = "input"
DATATYPE_OF = {"logits": "FP32", "predictions": "INT64", "probabilities": "FP32"}  # the model's outputs
OUTPUTS = tuple(DATATYPE_OF)
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
# Datatypes a client may send; every one is converted to the model's FP32. BOOL, BYTES and BF16
# (no numpy type) are refused with the fix.
DATATYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
}


def bad_request(message: str) -> RequestError:
    return RequestError(400, "bad_request", message)


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "tandem", "version": version, "extensions": EXTENSIONS}


def model_metadata(name: str, version: str, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [version],
        "platform": "tandem",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": [-1] if name == "predictions" else [-1, num_classes]}
            for name, datatype in DATATYPE_OF.items()
        ],
    }


def check_model(name: str, version: str | None, served_name: str, served_version: str) -> None:
    """A 404 naming what is served when the path names another model or version."""
    if name != served_name:
        raise RequestError(
            404, "unknown_model", f"unknown model '{name}'; this endpoint serves '{served_name}' (GET /v2/models/{served_name})"
        )
    if version is not None and version != served_version:
        raise RequestError(404, "unknown_version", f"model '{name}' has no version '{version}'; the served version is '{served_version}'")


@dataclass
class InferRequest:
    x: np.ndarray  # float32 (N, *input_shape)
    request_id: str | None
    outputs: dict[str, bool]  # output name -> as binary data


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body, per the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit():
        raise bad_request(f"{HEADER_LENGTH} must be a byte count, got {header_length!r}")
    length = int(header_length)
    if length == 0 or length > len(body):
        raise bad_request(
            f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes; it must be the length of the JSON part at the body's start"
        )
    return body[:length], body[length:]


def parse_infer(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_inputs: int) -> InferRequest:
    """The inference request in a body, or a RequestError (400) that names the request part and the fix."""
    head, binary = split_body(body, header_length)
    request = parse_json(head)
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise bad_request(f'the request must be a JSON object with "inputs": a list holding one tensor named "{INPUT}"')
    tensors = request["inputs"]
    names = [t.get("name") if isinstance(t, dict) else None for t in tensors]
    if names != [INPUT]:
        unknown = [n for n in names if n != INPUT]
        raise bad_request(
            f'"inputs" must hold exactly one tensor named "{INPUT}"; got {names}' + (f" (unknown: {unknown})" if unknown else "")
        )
    x, used = input_tensor(tensors[0], binary, input_shape, max_inputs)
    if used != len(binary):
        raise bad_request(
            f"the body holds {len(binary)} bytes of binary data but the inputs declare {used} (binary_data_size); they must match"
        )
    request_id = request.get("id")
    return InferRequest(x=x, request_id=str(request_id) if request_id is not None else None, outputs=requested_outputs(request))


def input_tensor(tensor: dict[str, Any], binary: bytes, input_shape: tuple[int, ...], max_inputs: int) -> tuple[np.ndarray, int]:
    """(float32 batch, binary bytes it used) of the one input tensor."""
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise bad_request(f'input "{INPUT}" has datatype {datatype!r}; send FP32 (or another numeric type: {", ".join(DATATYPES)})')
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad_request(f'input "{INPUT}" needs "shape": a list of non-negative integers like [N, {", ".join(map(str, input_shape))}]')
    if tuple(shape[1:]) != tuple(input_shape) or len(shape) != len(input_shape) + 1 or shape[0] == 0:
        raise bad_request(f'input "{INPUT}" has shape {shape}; expected [N, {", ".join(map(str, input_shape))}] with N >= 1')
    if shape[0] > max_inputs:
        raise RequestError(
            413, "too_many_inputs", f"the input holds {shape[0]} examples, over the limit of {max_inputs} (serving.limits.max_inputs)"
        )
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size < 0:
            raise bad_request(f'input "{INPUT}": binary_data_size must be a byte count, got {size!r}')
        if size > len(binary):
            raise bad_request(f'input "{INPUT}" declares {size} bytes of binary data but the body holds {len(binary)} after the JSON')
        if size != count * dtype.itemsize:
            raise bad_request(
                f'input "{INPUT}" declares {size} bytes, but shape {shape} of {datatype} takes {count * dtype.itemsize}; '
                "send exactly the tensor's bytes"
            )
        array, used = np.frombuffer(binary[:size], dtype=dtype), size
    else:
        if "data" not in tensor:
            raise bad_request(f'input "{INPUT}" has neither "data" nor parameters.binary_data_size; send one of them')
        try:
            array = np.asarray(tensor["data"], dtype=np.float64)
        except (ValueError, TypeError):
            raise bad_request(f'input "{INPUT}": "data" must be numbers (a flat row-major list, or nested lists)') from None
        used = 0
        if array.size != count:
            raise bad_request(f'input "{INPUT}" has {array.size} values in "data" but shape {shape} needs {count}')
    with np.errstate(over="ignore", invalid="ignore"):
        batch = array.reshape(shape).astype(np.float32)
    if not np.isfinite(batch).all():
        raise bad_request(f'input "{INPUT}" holds NaN or infinity (or a number beyond float32); send finite numbers')
    return batch, used


def requested_outputs(request: dict[str, Any]) -> dict[str, bool]:
    """Output name -> whether it goes back as binary data; all outputs when none is named."""
    parameters = request.get("parameters") or {}
    binary_default = bool(parameters.get("binary_data_output", False)) if isinstance(parameters, dict) else False
    outputs = request.get("outputs")
    if outputs is None:
        return {name: binary_default for name in OUTPUTS}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad_request('"outputs" must be a list of {"name": ..., "parameters": {"binary_data": true|false}}')
    chosen: dict[str, bool] = {}
    for output in outputs:
        name = output.get("name")
        if name not in OUTPUTS:
            raise bad_request(f"unknown output {name!r}; the model has {list(OUTPUTS)}")
        chosen[name] = bool((output.get("parameters") or {}).get("binary_data", binary_default))
    return chosen


def output_arrays(logits: np.ndarray, probabilities: np.ndarray | None) -> dict[str, np.ndarray]:
    arrays = {"logits": logits.astype("<f4", copy=False), "predictions": logits.argmax(axis=1).astype("<i8")}
    if probabilities is not None:
        arrays["probabilities"] = probabilities.astype("<f4", copy=False)
    return arrays


def infer_response(model: str, version: str, request: InferRequest, arrays: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """(body, JSON length for Inference-Header-Content-Length or None when there is no binary part)."""
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        array = arrays[name]
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE_OF[name], "shape": list(array.shape)}
        if binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.request_id is not None:
        response["id"] = request.request_id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
