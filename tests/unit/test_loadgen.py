"""The load generator's request encodings (serving/loadgen.py), without Ray: what it sends is
decoded by the server's own parsers (serving/oip.py for /v2, serving/protocol.py for /v1), and a
tiny asyncio server checks the bytes that go on the wire."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from serving.loadgen import BINARY_TYPE, JSON_TYPE, V1_PATH, closed_loop, encode_requests, summarize, wire_for
from serving.oip import HEADER_LENGTH, parse_infer, split_body
from serving.protocol import parse_predict

SHAPE = (64,)


def examples(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, *SHAPE)).astype(np.float32)


def test_v2_bodies_decode_to_the_same_example_asking_for_binary_predictions():
    rows = examples(3)
    wire = wire_for("v2", model="digits")
    header_length = dict(wire.headers)[HEADER_LENGTH]
    for row, body in zip(rows, encode_requests(rows, protocol="v2"), strict=True):
        request = parse_infer(body, header_length, SHAPE, max_inputs=256)
        np.testing.assert_array_equal(request.x, row[None])  # float32 round trip: bit for bit
        assert request.outputs == {"predictions": True}
        head, binary = split_body(body, header_length)
        assert json.loads(head)["inputs"][0]["shape"] == [1, 64] and len(binary) == 256


def test_v2_wire_names_the_model_path_and_binary_content_type():
    wire = wire_for("v2", model="digits")
    assert wire.path == "/v2/models/digits/infer" and wire.content_type == BINARY_TYPE
    assert wire_for("v2", path="/other").path == "/other"
    with pytest.raises(ValueError, match="model name"):
        wire_for("v2")
    with pytest.raises(ValueError, match="unknown protocol"):
        wire_for("v3")
    with pytest.raises(ValueError, match="predictions only"):
        encode_requests(examples(1), probabilities=True, protocol="v2")


def test_v1_bodies_are_unchanged_and_parse_as_predict_requests():
    rows = examples(2)
    bodies = encode_requests(rows)
    assert json.loads(bodies[0]) == {"inputs": rows[0].tolist(), "probabilities": False}
    x, probabilities = parse_predict(json.loads(bodies[1]), SHAPE, 256)
    np.testing.assert_array_equal(x, rows[1:2])
    assert probabilities is False
    wire = wire_for("v1")
    assert (wire.path, wire.content_type, wire.headers) == (V1_PATH, JSON_TYPE, ())
    assert wire_for("v1", path="/predict").path == "/predict"


def test_closed_loop_sends_the_wire_path_content_type_and_headers():
    """One keep-alive connection, three v2 requests: the server sees each with the v2 path and
    headers, and a body the OIP parser accepts."""
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request_line := await reader.readline():
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
            seen.append((request_line.decode().split()[1], headers, body))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    async def run() -> list[dict]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            wire = wire_for("v2", model="wide")
            return await closed_loop(f"http://127.0.0.1:{port}/wide", encode_requests(examples(3), protocol="v2"), 1, wire=wire)

    records = asyncio.run(run())
    assert summarize(records, 1.0, 1).ok == 3
    assert [path for path, _, _ in seen] == ["/wide/v2/models/wide/infer"] * 3
    for _, headers, body in seen:
        assert headers["content-type"] == BINARY_TYPE
        parse_infer(body, headers[HEADER_LENGTH.lower()], SHAPE, max_inputs=256)
