"""Hostile HTTP against the real app, and bearer-token auth: over real HTTP, one app for the module.

The app is the common shape (the model deployment is the FastAPI ingress, behind Ray's HAProxy),
with `serving.auth.token_env` set, small limits (so that oversize bodies are cheap to send) and the
cache off (so that every accepted request reaches the batcher, whose counters prove what did not).

- Fuzz: hypothesis-generated requests to /v1/predict: mutated valid bodies (wrong shapes, NaN and
  infinity as numbers and as strings, numbers beyond float64, deep nesting, extra keys), random
  JSON, non-UTF-8 bytes, empty and oversize bodies (with Content-Length and chunked), random
  content types and Authorization headers. No 5xx; every 4xx is JSON {"error", "message"}, and the
  replica (pid), replica count and model version are the same afterwards.
- Other methods and unknown paths: a separate test, since those answers come from FastAPI's
  defaults rather than Tandem's decoder.
- Auth: requests without the token or with a wrong one get 401 and never reach the batcher; the
  token never shows up in Ray's session logs, the Prometheus text, the run folder or the rendered
  manifests.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_serving import serving_config
from tests.reliability.figures import record

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]

NAME = "fuzz-auth"
TOKEN_ENV = "TANDEM_FUZZ_TOKEN"
MAX_BODY = 16_000
MAX_INPUTS = 8
SHAPE = 64
FUZZ_EXAMPLES = 400


@pytest.fixture(scope="module")
def token() -> str:
    value = "tdm-" + secrets.token_hex(20)
    previous = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = value
    yield value
    if previous is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = previous


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-auth")


@pytest.fixture(scope="module")
def config(storage):
    return serving_config(
        storage,
        NAME,
        {
            "deployments": [
                {
                    "name": "cpu",
                    "engine": "torch",
                    "cpus": 0.5,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    "max_ongoing_requests": 32,
                }
            ],
            "batching": {"max_batch_size": 8, "target_p99_ms": 200},
            "cache": {"enabled": False},
            "limits": {"max_inputs": MAX_INPUTS, "max_body_bytes": MAX_BODY},
            "auth": {"token_env": TOKEN_ENV},
        },
    )


@pytest.fixture(scope="module")
def artifact(shared_artifact) -> Path:
    """The session's small digits MLP (tests/conftest.py), served here by the torch engine."""
    return shared_artifact[1]


@pytest.fixture(scope="module")
def url(ray_session, config, artifact, token):
    from ray import serve

    from serving.deploy import serve as deploy

    base = deploy(config, artifact=str(artifact))
    yield base
    try:
        serve.delete(config.name)
    except Exception:
        pass


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def snapshot(url: str, token: str, config) -> dict[str, Any]:
    from serving.deploy import status

    stats = httpx.get(f"{url}/v1/stats", headers=auth(token), timeout=10).json()
    models = httpx.get(f"{url}/v1/models", headers=auth(token), timeout=10).json()["models"]
    return {
        "pid": stats["pid"],
        "version": stats["version"],
        "model_version": models[0]["version"],
        "replicas": status(config),
        "requests": stats["batcher"]["requests"],
        "batches": stats["batcher"]["batches"],
    }


def predicts(url: str, token: str) -> bool:
    reply = httpx.post(f"{url}/v1/predict", json={"inputs": [0.25] * SHAPE}, headers=auth(token), timeout=30)
    return reply.status_code == 200 and len(reply.json()["predictions"]) == 1


def error_body_problem(reply: httpx.Response) -> str | None:
    """Why a 4xx answer is not a Tandem error body, or None when it is one."""
    try:
        body = reply.json()
    except ValueError:
        return f"not JSON: {reply.text[:120]!r}"
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return f"no 'error' code: {str(body)[:160]}"
    if not isinstance(body.get("message"), str) or len(body["message"]) < 10:
        return f"no 'message': {str(body)[:160]}"
    return None


# ---------------------------------------------------------------------------------------------
# request strategies
# ---------------------------------------------------------------------------------------------

# Elements as raw JSON text, so NaN, Infinity and numbers beyond float64 reach the server as sent.
ELEMENTS = st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False).map(repr),
    st.integers(-100, 100).map(str),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e309",
            "-1e400",
            "3.5e38",
            "1" + "0" * 400,
            '"NaN"',
            '"inf"',
            '"1.0"',
            "null",
            "true",
            "{}",
            "[]",
            '"\\u0000"',
        ]
    ),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20,
)


@st.composite
def inputs_text(draw) -> str:
    """The JSON text of an "inputs" value: mostly near the right shape, with mutations."""
    kind = draw(st.sampled_from(["batch", "single", "nonfinite", "deep", "scalar", "random", "ragged", "too_many", "empty"]))
    normal = st.floats(0, 16, allow_nan=False).map(lambda v: repr(round(v, 3)))

    def row(width: int, bad: bool) -> str:
        items = [draw(ELEMENTS) if bad and draw(st.booleans()) else draw(normal) for _ in range(width)]
        return "[" + ",".join(items) + "]"

    width = draw(st.sampled_from([SHAPE, SHAPE, SHAPE, 0, 1, 63, 65, 128]))
    bad = draw(st.booleans())
    if kind == "single":
        return row(width, bad)
    if kind == "nonfinite":  # the right shape, one value NaN, infinite or beyond float32
        items = [draw(normal) for _ in range(SHAPE)]
        items[draw(st.integers(0, SHAPE - 1))] = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e309", "3.5e38", "-1e39"]))
        return "[" + ",".join(items) + "]"
    if kind in ("batch", "too_many"):
        n = draw(st.integers(1, MAX_INPUTS)) if kind == "batch" else draw(st.integers(MAX_INPUTS + 1, 3 * MAX_INPUTS))
        return "[" + ",".join(row(width, bad) for _ in range(n)) + "]"
    if kind == "ragged":
        return "[" + ",".join(row(draw(st.sampled_from([SHAPE, 10, 0])), bad) for _ in range(3)) + "]"
    if kind == "deep":
        # Deeper than about 900 is test_json_the_decoder_cannot_take_gets_a_4xx_not_a_500's case.
        depth = draw(st.sampled_from([3, 8, 33, 100, 300]))
        return "[" * depth + row(SHAPE if depth < 50 else 1, bad) + "]" * depth
    if kind == "scalar":
        return draw(ELEMENTS)
    if kind == "empty":
        return draw(st.sampled_from(["[]", "[[]]", '""', "{}"]))
    return json.dumps(draw(json_values))


@st.composite
def bodies(draw) -> tuple[str, bytes]:
    """(what it is, the body bytes)."""
    kind = draw(
        st.sampled_from(
            ["predict"] * 5
            + ["extra_keys", "probabilities", "random_json", "not_object", "bytes", "non_utf8", "empty", "oversize", "truncated"]
        )
    )
    inputs = draw(inputs_text())
    if kind == "predict":
        return kind, b'{"inputs": ' + inputs.encode() + b"}"
    if kind == "extra_keys":
        key = draw(st.sampled_from(["input", "Inputs", "inputs ", "model", "__proto__", "probabilities\u0000"]))
        return kind, b'{"inputs": ' + inputs.encode() + b", " + json.dumps(key).encode() + b": 1}"
    if kind == "probabilities":
        flag = draw(st.sampled_from(["true", "false", '"yes"', "1", "null", "[]"]))
        return kind, b'{"inputs": ' + inputs.encode() + b', "probabilities": ' + flag.encode() + b"}"
    if kind == "random_json":
        return kind, json.dumps(draw(json_values)).encode()
    if kind == "not_object":
        return kind, inputs.encode()
    if kind == "bytes":
        return kind, draw(st.binary(max_size=200))
    if kind == "non_utf8":
        return kind, b'{"inputs": [' + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"])) + b"]}"
    if kind == "empty":
        return kind, b""
    if kind == "oversize":
        return kind, b'{"inputs": [' + b"0.5," * draw(st.integers(MAX_BODY // 4, MAX_BODY)) + b"0.5]}"
    body = b'{"inputs": ' + inputs.encode() + b"}"
    return kind, body[: draw(st.integers(0, max(0, len(body) - 1)))]


@st.composite
def requests_(draw, token: str) -> dict[str, Any]:
    kind, body = draw(bodies())
    headers: dict[str, str] = {}
    content_type = draw(
        st.sampled_from(
            ["application/json"] * 4
            + [
                None,
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/json; charset=latin-1",
                "image/png",
            ]
        )
    )
    if content_type is not None:
        headers["Content-Type"] = content_type
    auth_kind = draw(st.sampled_from(["valid"] * 6 + ["none", "wrong", "basic", "empty", "prefix", "lowercase-scheme", "padded"]))
    value = {
        "valid": f"Bearer {token}",
        "wrong": f"Bearer {secrets.token_hex(20)}",
        "basic": "Basic dXNlcjpwYXNz",
        "empty": "Bearer",
        "prefix": f"Bearer {token[:-1]}",
        "lowercase-scheme": f"bearer {token}",
        "padded": f"Bearer \t {token}",
    }.get(auth_kind)
    if value is not None:
        headers["Authorization"] = value
    chunked = draw(st.booleans()) if body else False
    return {"kind": kind, "auth": auth_kind, "body": body, "headers": headers, "chunked": chunked}


def send(client: httpx.Client, url: str, request: dict[str, Any]) -> httpx.Response:
    body = request["body"]
    # A generator body goes out chunked, without Content-Length: the size limit must hold while streaming.
    content = (body[i : i + 4096] for i in range(0, len(body), 4096)) if request["chunked"] else body
    return client.post(f"{url}/v1/predict", content=content, headers=request["headers"])


def expected_status(request: dict[str, Any]) -> int | None:
    """The status the request must get where the rules say it plainly (None: any 2xx/4xx)."""
    if request["auth"] in ("none", "wrong", "basic", "empty", "prefix"):
        return 401
    if request["kind"] == "oversize":
        return 413
    if request["kind"] in ("empty", "non_utf8"):
        return 400
    return None


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_fuzzed_predict_requests_get_no_5xx_and_json_4xx_and_leave_the_replica_as_it_was(url, config, token):
    before = snapshot(url, token, config)
    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    failures: list[str] = []
    client = httpx.Client(timeout=30)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(request=requests_(token))
    def fuzz(request):
        reply = send(client, url, request)
        statuses[reply.status_code] += 1
        by_kind[request["kind"]] += 1
        content_type = request["headers"].get("Content-Type")
        shown = f"{request['kind']}/{request['auth']}/{content_type}/chunked={request['chunked']} {request['body'][:150]!r}"
        if reply.status_code >= 500:
            failures.append(f"{reply.status_code} {reply.text[:200]!r} <- {shown}")
        elif 400 <= reply.status_code < 500 and (problem := error_body_problem(reply)):
            failures.append(f"{reply.status_code} {problem} <- {shown}")
        want = expected_status(request)
        if want is not None and reply.status_code != want:
            failures.append(f"{reply.status_code}, expected {want}: {reply.text[:160]!r} <- {shown}")
        if reply.status_code == 200:
            body = reply.json()
            assert body["model_version"] == before["model_version"] and all(isinstance(p, int) for p in body["predictions"])

    started = time.monotonic()
    try:
        fuzz()
    finally:
        client.close()
    seconds = time.monotonic() - started
    after = snapshot(url, token, config)
    server_errors = sum(n for s, n in statuses.items() if s >= 500)
    record(
        "http_fuzz",
        cases_tried=sum(statuses.values()),
        statuses=dict(sorted(statuses.items())),
        status_5xx=server_errors,
        bad_4xx_bodies=sum(1 for f in failures if f[:1] == "4"),
        case_kinds=dict(sorted(by_kind.items())),
        seconds=round(seconds, 1),
        replica_pid_unchanged=after["pid"] == before["pid"],
        replicas_before=before["replicas"],
        replicas_after=after["replicas"],
        model_version_unchanged=after["model_version"] == before["model_version"],
    )
    print(f"fuzz: {sum(statuses.values())} requests in {seconds:.0f} s, statuses {dict(statuses)}")
    assert not failures, f"{len(failures)} bad answers:\n" + "\n".join(failures[:15])
    assert sum(statuses.values()) >= FUZZ_EXAMPLES * 0.9 and statuses[200] > 0 and statuses[401] > 0 and statuses[413] > 0
    assert (after["pid"], after["replicas"], after["model_version"], after["version"]) == (
        before["pid"],
        before["replicas"],
        before["model_version"],
        before["version"],
    )
    assert predicts(url, token)


# Bodies Python's json module refuses with an exception other than JSONDecodeError.
UNDECODABLE = {
    "nested_5000_deep": b'{"inputs": ' + b"[" * 5000 + b"[0.5]" + b"]" * 5000 + b"}",
    "integer_of_5000_digits": b'{"inputs": [' + b"1" * 5000 + b"]}",
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_json_the_decoder_cannot_take_gets_a_4xx_not_a_500(url, config, token, case):
    before = snapshot(url, token, config)
    reply = httpx.post(
        f"{url}/v1/predict", content=UNDECODABLE[case], headers={**auth(token), "Content-Type": "application/json"}, timeout=30
    )
    after = snapshot(url, token, config)
    assert (after["pid"], after["replicas"]) == (before["pid"], before["replicas"]) and predicts(url, token)
    record(f"http_undecodable_{case}", body_bytes=len(UNDECODABLE[case]), status=reply.status_code, replica_unharmed=True)
    assert 400 <= reply.status_code < 500, (case, reply.status_code, reply.text[:300])
    assert error_body_problem(reply) is None, reply.text[:300]


ODD_REQUESTS = [
    ("GET", "/v1/predict"),
    ("PUT", "/v1/predict"),
    ("DELETE", "/v1/predict"),
    ("PATCH", "/v1/predict"),
    ("POST", "/v1/models"),
    ("POST", "/v1/nope"),
    ("GET", "/v2/predict"),
    ("GET", "/v1/predict/../../etc/passwd"),
    ("GET", "/%00"),
    ("POST", "/v1/predict/"),
]


def test_other_methods_and_unknown_paths_get_404_or_405_with_json_error_bodies(url, config, token):
    """Each odd request once: a 404 or 405 (a redirect for the trailing slash), never a 5xx, a JSON
    error body on every refusal, and the replica unharmed (same process, no prediction counted)."""
    before = snapshot(url, token, config)
    seen: Counter = Counter()
    bad = []
    with httpx.Client(timeout=30) as client:
        for method, path in ODD_REQUESTS:
            reply = client.request(method, url + path, headers=auth(token), content=b'{"inputs": [0.5]}' if method != "GET" else None)
            seen[reply.status_code] += 1
            answer = (method, path, reply.status_code, reply.text)
            assert reply.status_code in (404, 405) or (method, path) == ("POST", "/v1/predict/"), answer
            assert reply.status_code < 500, answer
            # A redirect (POST /v1/predict/ -> 307 to /v1/predict) is not a refusal: no error body due.
            if reply.status_code >= 400 and (problem := error_body_problem(reply)) is not None:
                bad.append(f"{method} {path} -> {reply.status_code} {problem}")
    after = snapshot(url, token, config)
    assert (after["pid"], after["replicas"], after["requests"]) == (before["pid"], before["replicas"], before["requests"])
    record("http_odd_requests", requests=sum(seen.values()), statuses=dict(sorted(seen.items())), status_5xx=0, without_error_body=len(bad))
    assert predicts(url, token)
    assert not bad, "\n".join(bad)


WRONG_CREDENTIALS = {
    "none": None,
    "wrong token": "Bearer {other}",
    "token of another length": "Bearer x",
    "token minus its last character": "Bearer {token_short}",
    "token with one more character": "Bearer {token}x",
    "empty bearer": "Bearer",
    "basic auth": "Basic {basic}",
    "token without a scheme": "{token}",
    "token in another scheme": "Token {token}",
    "upper-cased token": "Bearer {token_upper}",
}


def test_missing_or_wrong_tokens_get_401_and_reach_no_replica(url, config, token):
    import base64

    values = {
        "other": secrets.token_hex(20),
        "token": token,
        "token_short": token[:-1],
        "token_upper": token.upper(),
        "basic": base64.b64encode(f"user:{token}".encode()).decode(),
    }
    before = snapshot(url, token, config)
    refused = 0
    with httpx.Client(timeout=30) as client:
        for what, template in WRONG_CREDENTIALS.items():
            headers = {} if template is None else {"Authorization": template.format(**values)}
            for method, path, body in (
                ("POST", "/v1/predict", {"inputs": [0.5] * SHAPE}),
                ("GET", "/v1/models", None),
                ("GET", "/v1/stats", None),
            ):
                for _ in range(3):
                    reply = client.request(method, f"{url}{path}", json=body, headers=headers)
                    assert reply.status_code == 401, (what, path, reply.status_code, reply.text)
                    assert reply.json()["error"] == "unauthorized" and "Bearer" in reply.headers.get("www-authenticate", ""), (
                        what,
                        reply.text,
                    )
                    assert token not in reply.text
                    refused += 1
    after = snapshot(url, token, config)
    # Not one of them reached the batcher: its request and batch counters did not move...
    assert (after["requests"], after["batches"]) == (before["requests"], before["batches"]), (before, after)
    # ...while one request with the token moves them (the counters are live).
    assert predicts(url, token)
    moved = snapshot(url, token, config)
    assert moved["requests"] == before["requests"] + 1, (before, moved)
    record("auth_refusals", requests_refused=refused, status_401=refused, reached_batcher=0, credentials_tried=len(WRONG_CREDENTIALS))


def occurrences(folder: Path, needle: bytes) -> tuple[int, int, list[str]]:
    """(files searched, occurrences of needle, files holding it) under a folder."""
    files, found, where = 0, 0, []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            files += 1
            if needle in data:
                found += data.count(needle)
                where.append(str(path))
    return files, found, where


LEAKS: dict[str, dict[str, Any]] = {}


def record_leaks() -> None:
    record(
        "auth_token_leaks",
        token_occurrences=sum(v["found"] for v in LEAKS.values()),
        files_searched=sum(v["files"] for v in LEAKS.values()),
        by_place={k: v["found"] for k, v in LEAKS.items()},
        files_by_place={k: v["files"] for k, v in LEAKS.items()},
    )


def search(place: str, folder: Path, token: str) -> dict[str, Any]:
    LEAKS[place] = dict(zip(("files", "found", "where"), occurrences(folder, token.encode()), strict=True))
    record_leaks()
    return LEAKS[place]


def test_the_token_never_appears_in_the_run_folder_manifests_or_answers(url, config, token, artifact, tmp_path):
    from serving.serve_config import write_serve_config
    from tandem.k8s_files import write_manifests

    assert predicts(url, token)
    wrong = httpx.post(f"{url}/v1/predict", json={"inputs": [0.5] * SHAPE}, headers={"Authorization": f"Bearer {token}x"}, timeout=30)
    answers = (
        wrong.text + str(wrong.headers) + httpx.get(f"{url}/openapi.json", timeout=10).text + httpx.get(f"{url}/healthz", timeout=10).text
    )
    answers += (
        httpx.get(f"{url}/v1/stats", headers=auth(token), timeout=10).text
        + httpx.get(f"{url}/v1/models", headers=auth(token), timeout=10).text
    )
    LEAKS["http answers"] = {"files": 5, "found": answers.count(token), "where": []}
    run = search("run folder", artifact.parent, token)

    manifests = tmp_path / "manifests"
    write_serve_config(config, manifests / "serve_config.yaml", artifact=str(artifact.parent))
    write_manifests(config, manifests / "k8s")
    rendered = search("manifests", manifests, token)
    # The manifests carry the token by reference (a Secret the pods read into TOKEN_ENV), never by value.
    assert "serving-token" in (manifests / "k8s" / "serve" / "rayservice.yaml").read_text()
    assert run["files"] >= 2 and rendered["files"] >= 2
    assert LEAKS["http answers"]["found"] == run["found"] == rendered["found"] == 0, (run["where"], rendered["where"])


# Tandem's series that every batch records (serving/metrics.py, TandemMetrics.on_batch): a replica
# that served a request exports all of them. The counters (shed, cache, spillover, retries) appear
# only once something increments them.
BATCH_METRICS = ("tandem_batch_size", "tandem_queue_wait_ms", "tandem_model_latency_ms", "tandem_batch_cap", "tandem_planned_wait_ms")


def exported_tandem_metrics(text: str) -> set[str]:
    """The Tandem metric names in a Prometheus text (Ray's "ray_" prefix and histogram suffixes dropped)."""
    return set(re.findall(r"^(?:ray_)?(tandem_\w+?)(?:_bucket|_count|_sum)?[{ ]", text, re.M))


def test_the_token_never_appears_in_the_prometheus_metrics(url, token):
    """Serve's and Tandem's metrics as Ray's metrics agent exports them (the app has no /metrics of
    its own). Ray prefixes application metrics with "ray_": tandem_batch_size is ray_tandem_batch_size."""
    import ray

    for _ in range(5):
        assert predicts(url, token)
    port = ray._private.worker._global_node.metrics_export_port
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline and not set(BATCH_METRICS) <= exported_tandem_metrics(text):
        time.sleep(2)
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
    serve_series = len(re.findall(r"^ray_serve_\w+", text, re.M))
    tandem_series = len(re.findall(r"^(?:ray_)?tandem_\w+", text, re.M))
    LEAKS["prometheus text"] = {"files": 1, "found": text.count(token), "where": [], "bytes": len(text)}
    record_leaks()
    record(
        "auth_token_in_metrics",
        prometheus_bytes=len(text),
        serve_series=serve_series,
        tandem_series=tandem_series,
        token_occurrences=text.count(token),
    )
    assert serve_series > 0, f"no Serve series on Ray's metrics port {port}: not the endpoint this test means to search"
    # Tandem's own series are there to be searched: a replica whose TandemMetrics() failed logs
    # "Tandem metrics are off" and exports none (seen while serving/metrics.py tagged a counter
    # "deployment", a tag Ray Serve reserves).
    missing = sorted(set(BATCH_METRICS) - exported_tandem_metrics(text))
    assert not missing, f"Tandem metrics missing from Ray's metrics port {port}: {missing}"
    assert text.count(token) == 0


def test_the_token_never_appears_in_rays_session_logs(url, token):
    import ray

    assert predicts(url, token)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    found = search("ray session logs", logs, token)
    assert found["files"] > 10
    assert found["found"] == 0, found["where"][:5]


def test_healthz_stays_open_for_probes_and_says_nothing_secret(url, token):
    """Kubernetes and HAProxy probe /healthz without credentials; it must answer, and only the version."""
    reply = httpx.get(f"{url}/healthz", timeout=10)
    assert reply.status_code == 200 and set(reply.json()) == {"status", "version", "deployment"} and token not in reply.text
