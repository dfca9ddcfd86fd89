"""Training vs inference, and what to do about it: `compare` and `recommendations` of a profile.

Each recommendation is {"topic", "advice", "figure"}: the advice names the config field to change
where there is one, and "figure" is the measured or counted number it rests on, so a reader can
check it against the tables of the same report.
"""

from __future__ import annotations

from typing import Any

from cluster.config import TandemConfig
from profiling.measure import peak_bandwidth
from profiling.plots import human_bytes, human_flops, human_seconds


def _row_at(engine: dict[str, Any], batch: int) -> dict[str, Any] | None:
    return next((r for r in engine["latency"] if r["batch"] == batch), None)


def compare(training: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
    engines = inference["engines"]
    reference = next((e for e in engines if e["label"] == "torch-fp32"), engines[0])
    smallest = min(inference["batch_sizes"])
    batch1 = min(engines, key=lambda e: _row_at(e, smallest)["p50_ms"])
    best_engine, best_row = max(((e, r) for e in engines for r in e["latency"]), key=lambda pair: pair[1]["examples_per_s"])
    train_s = training["step_s"] / training["batch_size"]
    infer1_s = _row_at(batch1, smallest)["p50_ms"] / 1e3 / smallest
    best_s = 1.0 / best_row["examples_per_s"]
    epoch_flops = training["train_examples"] * training["flops_per_example"]
    epoch_core_s = training["train_examples"] * train_s
    return {
        "training_flops_per_example": training["flops_per_example"],
        "inference_flops_per_example": reference["forward_flops_per_example"],
        "flops_ratio": training["flops_per_example"] / reference["forward_flops_per_example"],
        "training_s_per_example": train_s,
        "inference_s_per_example_batch1": infer1_s,
        "best_batch1_engine": batch1["label"],
        "inference_s_per_example_best": best_s,
        "best_throughput_engine": best_engine["label"],
        "best_throughput_batch": best_row["batch"],
        "time_ratio_batch1": train_s / infer1_s,
        "time_ratio_best": train_s / best_s,
        "epoch_flops": epoch_flops,
        "epoch_core_s": epoch_core_s,
        "inferences_per_epoch_by_flops": epoch_flops / reference["forward_flops_per_example"],
        "inferences_per_epoch_by_time_batch1": epoch_core_s / infer1_s,
        "inferences_per_epoch_by_time_best": epoch_core_s / best_s,
        "run_flops": epoch_flops * training["epochs"],
        "run_core_s": epoch_core_s * training["epochs"],
    }


def _advice(topic: str, advice: str, figure: str) -> dict[str, str]:
    return {"topic": topic, "advice": advice, "figure": figure}


def _serving_batch(config: TandemConfig, batch_sizes: list[int]) -> int:
    """The largest measured batch size the configured batcher can form."""
    fitting = [b for b in batch_sizes if b <= config.serving.batching.max_batch_size]
    return max(fitting) if fitting else min(batch_sizes)


def recommend_serving_engine(config: TandemConfig, inference: dict[str, Any]) -> dict[str, str]:
    batch = _serving_batch(config, inference["batch_sizes"])
    # Chosen by p50: on a shared machine one descheduled run decides a p99 of a few hundred runs.
    engine = min(inference["engines"], key=lambda e: _row_at(e, batch)["p50_ms"])
    row = _row_at(engine, batch)
    per_unit = batch / (row["p50_ms"] / 1e3)
    unit = "GPU" if engine["device"] == "cuda" else "core"
    return _advice(
        "serving engine",
        f"serve on {'GPU' if unit == 'GPU' else 'CPU'} with {engine['label']}: p50 {row['p50_ms']:.3g} ms (p99 {row['p99_ms']:.3g} ms) at "
        f"batch {batch} "
        f"(serving.batching.max_batch_size) handles ~{per_unit:,.0f} examples/s per {unit} before the Serve path's own cost",
        f"{engine['label']} at batch {batch}: p50 {row['p50_ms']:.3g} ms, p99 {row['p99_ms']:.3g} ms, "
        + (f"{engine['threads']} thread" if engine["threads"] else "one GPU"),
    )


def recommend_batching(inference: dict[str, Any]) -> dict[str, str]:
    engine = max(inference["engines"], key=lambda e: max(r["examples_per_s"] for r in e["latency"]))
    first = engine["latency"][0]
    best = max(engine["latency"], key=lambda r: r["examples_per_s"])
    gain = best["examples_per_s"] / first["examples_per_s"]
    if gain >= 2:
        advice = (
            f"batch requests: {engine['label']} serves {gain:.1f}x more examples/s at batch {best['batch']} than at batch "
            f"{first['batch']}; "
            f"keep adaptive batching on with max_batch_size >= {best['batch']} where latency allows"
        )
    else:
        advice = f"batching buys little here ({gain:.1f}x at best): keep batch waits short, they cost latency and return little throughput"
    return _advice(
        "batching",
        advice,
        f"{engine['label']}: {first['examples_per_s']:,.0f} examples/s at batch {first['batch']}, "
        f"{best['examples_per_s']:,.0f} at batch {best['batch']}",
    )


def recommend_quantization(config: TandemConfig, inference: dict[str, Any], training_ops: dict[str, int]) -> dict[str, str] | None:
    by_label = {e["label"]: e for e in inference["engines"]}
    if "onnx-int8" not in by_label or "onnx-fp32" not in by_label:
        return None
    batch = _serving_batch(config, inference["batch_sizes"])
    int8, fp32 = _row_at(by_label["onnx-int8"], batch), _row_at(by_label["onnx-fp32"], batch)
    speedup = fp32["p50_ms"] / int8["p50_ms"]
    if speedup >= 1.1:
        advice = f"serve the int8 model: {speedup:.2f}x faster than ONNX fp32 at batch {batch}"
    elif any("convolution" in op for op in training_ops):
        advice = (
            f"do not quantize for speed: int8 is {speedup:.2f}x ONNX fp32 at batch {batch}; for convolutions try export.quantize: static"
        )
    else:
        weights = by_label["onnx-fp32"]["memory"]["weights_bytes"]
        advice = (
            f"do not quantize for speed: int8 is {speedup:.2f}x ONNX fp32 at batch {batch}; the fp32 weights ({_bytes(weights)}) "
            "already sit in cache, so int8 buys a smaller file, not time"
        )
    return _advice("quantization", advice, f"p50 at batch {batch}: onnx-int8 {int8['p50_ms']:.3g} ms, onnx-fp32 {fp32['p50_ms']:.3g} ms")


def memory_per_rank(machine: dict[str, Any], device: str, workers: int) -> float:
    """Memory one rank may fill on this machine: a GPU's memory, or the machine's shared by the workers."""
    if device == "cuda" and machine.get("gpu_memory_bytes"):
        return float(machine["gpu_memory_bytes"])
    return machine["memory_bytes"] / max(1, workers)


def recommend_zero_stage(zero: dict[str, Any], machine: dict[str, Any], device: str) -> dict[str, str]:
    budget = memory_per_rank(machine, device, zero["workers"])
    per_param = {row["stage"]: row["total_bytes"] / max(1, zero["parameters"]) for row in zero["stages"]}
    limits = {stage: budget / b for stage, b in per_param.items()}
    configured = zero["stages"][zero["configured_stage"]]
    stage0 = zero["stages"][0]
    needed = next((s for s in range(4) if zero["parameters"] <= limits[s]), None)
    thresholds = ", ".join(f"ZeRO-{s} above {_count(limits[s - 1])}" for s in (1, 2, 3))
    where = f"{budget / 2**30:.1f} GiB per rank " + (
        "(one GPU each)" if device == "cuda" else f"({zero['workers']} workers on this machine)"
    )
    if needed is None:
        advice = (
            f"the training state does not fit on {where} even at ZeRO-3; "
            "offload it (training.deepspeed.offload_optimizer: cpu) or add workers"
        )
    elif needed > zero["configured_stage"]:
        advice = (
            f"raise training.deepspeed.zero_stage to {needed}: at ZeRO-{zero['configured_stage']} the state takes "
            f"{_bytes(configured['total_bytes'])} per rank, more than {where}"
        )
    elif needed < zero["configured_stage"]:
        saved = stage0["total_bytes"] - configured["total_bytes"]
        advice = (
            f"ZeRO-{needed} is enough for {zero['parameters']:,} parameters on {where}; the configured ZeRO-{zero['configured_stage']} "
            "saves "
            f"only {_bytes(saved)} per rank. Training needs {thresholds} (states only, activations not counted)"
        )
    else:
        advice = (
            f"ZeRO-{needed} is the smallest stage that fits on {where}. Training needs {thresholds} (states only, activations not counted)"
        )
    return _advice(
        "ZeRO stage",
        advice,
        f"{per_param[0]:.0f} / {per_param[1]:.1f} / {per_param[2]:.1f} / {per_param[3]:.1f} bytes per parameter per rank "
        f"at ZeRO-0/1/2/3 ({zero['precision']}, {zero['optimizer']}, {zero['workers']} workers)",
    )


def recommend_training_batch(config: TandemConfig, training: dict[str, Any], machine: dict[str, Any]) -> dict[str, str] | None:
    if training["fraction_of_peak"] is None:
        return None
    bandwidth = peak_bandwidth(machine, training["device"], training["threads"])
    ridge = training["peak_flops_per_s"] / bandwidth["bytes_per_s"] if bandwidth else None
    figure = (
        f"{_flops(training['achieved_flops_per_s'])}/s of {_flops(training['peak_flops_per_s'])}/s "
        f"({training['fraction_of_peak']:.1%}) at batch {training['batch_size']}, intensity {training['arithmetic_intensity']:.1f} FLOP/B"
        + (f" vs ridge {ridge:.1f}" if ridge else "")
    )
    if training["fraction_of_peak"] >= 0.3:
        return _advice("training efficiency", "the training step uses the hardware well; a larger batch would buy little", figure)
    if ridge and training["arithmetic_intensity"] < ridge:
        advice = (
            f"the training step reaches only {training['fraction_of_peak']:.1%} of peak and is memory-bound: raise data.batch_size "
            f"(now {config.data.batch_size}) so each weight read serves more examples; more bandwidth, not more FLOP/s, would help"
        )
    else:
        advice = (
            f"the training step reaches only {training['fraction_of_peak']:.1%} of peak and is overhead-bound (per-op dispatch, not "
            f"FLOPs or bytes): raise data.batch_size (now {config.data.batch_size}) to amortize it; faster hardware would barely shorten "
            "the step"
        )
    return _advice("training efficiency", advice, figure)


def recommend_training_hardware(training: dict[str, Any], run: dict[str, Any] | None) -> dict[str, str]:
    run_s = training["run_s"]
    figure = (
        f"{training['step_s'] * 1e3:.3g} ms per step at batch {training['batch_size']}, {training['micro_batches_per_epoch']} steps per "
        f"worker per epoch, {training['workers']} workers, {training['epochs']} epochs"
    )
    if run and run.get("step_time_vs_in_process"):
        figure += f"; the run's steps took {run['step_time_vs_in_process']:.1f}x the bare step (DeepSpeed, all-reduce, data loading)"
    if run_s < 600:
        advice = (
            f"the configured run takes ~{_seconds(run_s)} of compute here ({_seconds(training['epoch_s'])} per epoch): "
            f"{training['device'].upper()} is enough"
        )
    else:
        advice = (
            f"the configured run takes ~{_seconds(run_s)} here ({_seconds(training['epoch_s'])} per epoch): "
            "more workers or a GPU node group would pay"
        )
    return _advice("training hardware", advice, figure)


def recommend_served(served: list[dict[str, Any]] | None, inference: dict[str, Any]) -> dict[str, str] | None:
    if not served or not served[0]["requests"] or served[0]["ok"] == 0:
        return None
    fastest = min(e["latency"][0]["p50_ms"] for e in inference["engines"])
    overhead = served[0]["p50_ms"] - fastest
    return _advice(
        "serving path",
        f"a request spends {overhead:.3g} ms in the Serve path beyond the model at concurrency 1: "
        "batching and a short path matter more than the engine here"
        if overhead > 2 * fastest
        else "the Serve path adds little beyond the model",
        f"served p50 {served[0]['p50_ms']:.3g} ms vs fastest engine p50 {fastest:.3g} ms at batch 1",
    )


def recommendations(
    config: TandemConfig,
    training: dict[str, Any],
    inference: dict[str, Any],
    zero: dict[str, Any],
    machine: dict[str, Any],
    run: dict[str, Any] | None,
    served: list[dict[str, Any]] | None,
) -> list[dict[str, str]]:
    found = [
        recommend_serving_engine(config, inference),
        recommend_batching(inference),
        recommend_quantization(config, inference, training["flops_by_op"]),
        recommend_zero_stage(zero, machine, training["device"]),
        recommend_training_batch(config, training, machine),
        recommend_training_hardware(training, run),
        recommend_served(served, inference),
    ]
    return [r for r in found if r is not None]


def _count(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit} parameters"
    return f"{value:.0f} parameters"


_bytes, _flops, _seconds = human_bytes, human_flops, human_seconds
