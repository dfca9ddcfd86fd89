"""Measurements behind `tandem profile`: machine peaks, counted FLOPs, timed steps and batches.

Every function returns plain numbers, lists and dicts, so the report is JSON as it is.

- Peaks: a square matrix product per device, dtype and thread count, as `torch.mm` and as
  `F.linear` (the best of the two: in bf16 on an AVX2 CPU they differ 10x), sized up until one
  product takes a measurable time (bf16 `torch.mm` on a CPU without bf16 instructions runs ~100x
  slower than fp32, so a fixed 2048 x 2048 product would take seconds there), and a STREAM-style
  triad `a = b + s * c` for bandwidth. A peak is the best run, not the median: other processes only
  ever slow a run down. numpy's BLAS reaches far less than torch's on these machines, so both
  use torch.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts matrix products and convolutions
  (2 FLOPs per multiply-add); elementwise work (activations, bias adds, the optimizer step) is
  not counted, which is well under 1% for the models here.
- Bytes: an estimate of the least memory traffic (weights read once, each activation written
  once and read once), only to place a measurement on the roofline.
- Times: wall clock with `time.perf_counter`, after warm-up runs that allocate buffers and pick
  kernels; on CUDA every timed call ends in a host-device sync.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cluster.errors import TandemError
from serving.engines import torch_threads
from serving.loadgen import run_load
from serving.optimize.parity import batch_of


class ProfileError(TandemError, ValueError):
    """The profile could not be measured or written; the message names the cause and the fix."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Bytes one weight takes in each engine's format, for the roofline's traffic estimate.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # a host-device sync: the kernel queue drains before the clock stops


def time_calls(fn: Callable[[], Any], budget_s: float, min_runs: int = 3, max_runs: int = 100_000, warmup: int = 2) -> np.ndarray:
    """Seconds per call of `fn` over runs that fill about `budget_s` (at least `min_runs`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_runs and (len(times) < min_runs or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return np.asarray(times)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_thread_counts() -> list[int]:
    """One thread (what a Ray Train worker or a serving replica gets) and every usable core."""
    return sorted({1, usable_cores()})


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


GEMM_OPS = {
    "mm": lambda a, b: torch.mm(a, b),
    # a @ b.T through nn.Linear's kernel: on CPU in bf16 it takes oneDNN's path, ~10x torch.mm's
    # on an AVX2 machine without bf16 instructions (0.4-1.8 against 4-8 GFLOP/s measured).
    "linear": lambda a, b: F.linear(a, b),
}


def gemm_peak(device: str, dtype: str, max_size: int, budget_s: float, op: str = "mm") -> dict[str, Any]:
    """Best FLOP/s of a square matrix product, the size doubled from 128 until one product is measurable."""
    torch_dtype = DTYPES[dtype]
    size = 128
    while True:
        a = torch.randn(size, size, device=device).to(torch_dtype)
        b = torch.randn(size, size, device=device).to(torch_dtype)

        def product(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            GEMM_OPS[op](a, b)
            sync(device)

        # The best of three: on a shared machine a single run may have waited for a core.
        one = float(time_calls(product, 0.0, min_runs=3, warmup=1).min())
        if size >= max_size or one * 16 >= budget_s:
            break
        size *= 2
    times = time_calls(product, budget_s, min_runs=2, warmup=0)
    return {"device": device, "dtype": dtype, "op": op, "size": size, "runs": len(times), "flops_per_s": 2.0 * size**3 / float(times.min())}


def best_gemm_peak(device: str, dtype: str, max_size: int, budget_s: float) -> dict[str, Any]:
    """The faster of torch.mm and F.linear: the peak is what the model's own kernels can reach."""
    measured = [gemm_peak(device, dtype, max_size, budget_s / 2, op) for op in GEMM_OPS]
    best = max(measured, key=lambda m: m["flops_per_s"])
    return {**best, "by_op": {m["op"]: m["flops_per_s"] for m in measured}}


def triad_bandwidth(device: str, elements: int, budget_s: float) -> dict[str, Any]:
    """Best bytes/s of `a = b + s * c` (STREAM triad: two arrays read, one written, 4-byte floats)."""
    b = torch.rand(elements, device=device)
    c = torch.rand(elements, device=device)
    a = torch.empty_like(b)

    def triad() -> None:
        torch.add(b, c, alpha=3.0, out=a)
        sync(device)

    times = time_calls(triad, budget_s, min_runs=3)
    return {"device": device, "elements": elements, "runs": len(times), "bytes_per_s": 3 * 4 * elements / float(times.min())}


def measure_machine(devices: list[str], gemm_size: dict[str, int], triad_elements: dict[str, int], budget_s: float) -> dict[str, Any]:
    """Peaks per device, dtype and (on CPU) thread count, and what the machine is."""
    peaks: list[dict[str, Any]] = []
    bandwidth: list[dict[str, Any]] = []
    for device in devices:
        thread_counts = cpu_thread_counts() if device == "cpu" else [None]
        dtypes = ["fp32", "bf16"] if device == "cpu" or torch.cuda.is_bf16_supported() else ["fp32"]
        for threads in thread_counts:
            with torch_threads(threads or torch.get_num_threads()):
                for dtype in dtypes:
                    peaks.append({**best_gemm_peak(device, dtype, gemm_size[device], budget_s), "threads": threads})
                bandwidth.append({**triad_bandwidth(device, triad_elements[device], budget_s), "threads": threads})
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "memory_bytes": memory_bytes(),
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if "cuda" in devices else None,
        "load_average": load_average(),
        "versions": versions(),
        "peaks": peaks,
        "bandwidth": bandwidth,
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return found


def peak_flops(machine: dict[str, Any], device: str, dtype: str, threads: int | None) -> dict[str, Any] | None:
    """The measured peak that a measurement on (device, dtype, threads) is compared with.

    int8 has no measured peak of its own: int8 engines are compared with the fp32 peak, and the
    report says so.
    """
    dtype = "fp32" if dtype == "int8" else dtype
    threads = threads if device == "cpu" else None
    for peak in machine["peaks"]:
        if peak["device"] == device and peak["dtype"] == dtype and peak["threads"] == threads:
            return peak
    return None


def peak_bandwidth(machine: dict[str, Any], device: str, threads: int | None) -> dict[str, Any] | None:
    threads = threads if device == "cpu" else None
    for row in machine["bandwidth"]:
        if row["device"] == device and row["threads"] == threads:
            return row
    return None


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes
# ---------------------------------------------------------------------------------------------


def _by_op(counter: Any) -> dict[str, int]:
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def forward_flops(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Forward FLOPs per example (eval mode, no gradients), with the counts per aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {"per_example": counter.get_total_flops() / len(x), "by_op": _by_op(counter), "batch": len(x)}


def training_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Forward + backward FLOPs per example of a cross-entropy step (the optimizer step is elementwise, uncounted).

    The backward pass of a layer costs two products (input gradient and weight gradient) except
    for the first layer, whose input needs no gradient: about 3x the forward, a little less.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return {"per_example": counter.get_total_flops() / len(x), "by_op": _by_op(counter), "batch": len(x)}


def activation_bytes_per_example(model: nn.Module, x: torch.Tensor) -> float:
    """Bytes of every leaf module's output per example (fp32), from forward hooks."""
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if torch.is_tensor(output):
            total += output.numel() * 4

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total / len(x)


def inference_bytes(num_params: int, weight_format: str, batch: int, input_bytes: float, activation_bytes: float) -> float:
    """Least traffic of one forward pass: weights once, the input once, each activation written and read."""
    return num_params * WEIGHT_BYTES[weight_format] + batch * (input_bytes + 2 * activation_bytes)


def optimizer_traffic_per_param(optimizer: str) -> int:
    """Bytes an fp32 optimizer step moves per parameter: Adam reads p, g, m, v and writes p, m, v; SGD+momentum p, g, buf / p, buf."""
    return 7 * 4 if optimizer in ("adam", "adamw") else 5 * 4


def training_bytes(num_params: int, optimizer: str, batch: int, input_bytes: float, activation_bytes: float) -> float:
    """Least traffic of one training step: forward, a backward moving about twice that, the optimizer step."""
    forward = inference_bytes(num_params, "fp32", batch, input_bytes, activation_bytes)
    return 3 * forward + num_params * optimizer_traffic_per_param(optimizer)


# ---------------------------------------------------------------------------------------------
# training step and inference batches
# ---------------------------------------------------------------------------------------------


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str, device: str, grad_clip: float
) -> Callable[[], None]:
    """One optimizer step on one micro-batch, as a worker runs it (without DeepSpeed's communication).

    bf16/fp16 run under autocast: products in the half type, weights and optimizer in fp32, which
    is what DeepSpeed's mixed precision computes per step.
    """
    autocast = torch.autocast(device_type=device, dtype=DTYPES[precision]) if precision in ("bf16", "fp16") else contextlib.nullcontext()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        sync(device)

    return step


def latency_by_batch(
    predict: Callable[[np.ndarray], Any], examples: np.ndarray, batch_sizes: list[int], budget_s: float
) -> list[dict[str, Any]]:
    """p50/p99/mean latency and throughput of `predict` per batch size (real examples, repeated when few)."""
    rows = []
    for size in batch_sizes:
        batch = batch_of(examples, size)
        times = time_calls(lambda batch=batch: predict(batch), budget_s, min_runs=5)
        p50 = float(np.median(times))
        rows.append(
            {
                "batch": size,
                "runs": len(times),
                "p50_ms": p50 * 1e3,
                "p99_ms": float(np.percentile(times, 99)) * 1e3,
                "mean_ms": float(times.mean()) * 1e3,
                "examples_per_s": size / p50,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# a running Serve app
# ---------------------------------------------------------------------------------------------


def predict_url(url: str) -> str:
    """The app's predict endpoint: `url` itself when it names one, else `<url>/v1/predict`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1/predict") else f"{url}/v1/predict"


def probe_serve_app(url: str, example: np.ndarray, timeout_s: float = 10.0, token: str | None = None) -> None:
    """One request, so that a wrong URL fails before any measuring; raises ValueError naming the fix."""
    import httpx

    target = predict_url(url)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = httpx.post(target, json={"inputs": [example.tolist()]}, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        raise ProfileError(f"serve_url {url}: no answer from {target} ({exc}); start the app with `tandem serve` or drop the URL") from None
    if response.status_code == 401:
        raise ProfileError(f"serve_url {url}: {target} answered 401; export the token named by serving.auth.token_env")
    if response.status_code != 200:
        raise ProfileError(
            f"serve_url {url}: {target} answered {response.status_code} ({response.text[:200]}); check the URL and the route prefix"
        )


def served_latency(
    url: str, example: np.ndarray, concurrency: int, requests: int, deadline_s: float, token: str | None = None
) -> dict[str, Any]:
    """Closed-loop load on the app (serving.loadgen's LoadResult, as a dict): `concurrency` clients,
    one example per request, `requests` in all, for at most `deadline_s`."""
    base = url.rstrip("/").removesuffix("/v1/predict")
    return run_load(base, np.asarray(example)[None], requests, concurrency, token, max_seconds=deadline_s).to_dict()
