"""`tandem profile`: what training and inference of the configured model cost on this machine.

    report = profile(config, source="latest")       # or a run folder, an artifacts folder, None
    console.print(report.summary())                 # rich tables
    report.html_path                                # <run>/profile/profile.html, with PNG plots

One call measures, on the machine it runs on:

1. machine limits   fp32/bf16 GEMM peaks per thread count and triad bandwidth (CPU, and GPU
                    where present), profiling.measure
2. training         counted forward+backward FLOPs per example, a timed in-process step with the
                    configured optimizer, batch size and precision on one thread (what one Ray
                    Train worker gets), achieved fraction of peak, the epoch and run time at the
                    configured worker count, and ZeRO 0-3 bytes per rank by formula beside the
                    bytes a run measured (--from a run with metrics.jsonl)
3. inference        forward FLOPs, latency per batch size for every engine the artifact has
                    (torch fp32/bf16, ONNX fp32/int8, pruned, a distilled student), throughput,
                    memory and fraction of peak; a running Serve app at concurrency 1 and 32
                    when its URL is given
4. comparison       training vs inference per example (FLOPs, time), inferences per epoch, and
                    recommendations, each with the figure it rests on

The modules: profile (this one: what is profiled, the phases, the atomic write), profile_measure
(peaks, FLOPs, timings, the served load), profile_advice (comparison, recommendations),
profile_plots (PNGs) and profile_report (profile.json, profile.html, rich tables).

Without a trained artifact (source None and none under storage) the untrained model built from
the config is profiled, with torch rows only, and the report says so. Everything is measured
before anything is written; the report is then built in a hidden temp folder beside its target
and renamed into place, so a failing profile leaves no partial report (and an earlier report
stays until the new one is complete).

On an object store (cluster.storage or --out a URI such as s3://bucket/runs) the subject is read
from the store (its artifact through this node's cache, its run's metrics.jsonl and config.yaml
in place) and the report goes to the same place in the store: built in a local temp folder,
given a manifest.json (kind "profile", the sha256 of every file), then published file by file
with the manifest last (cluster.storage.publish_folder). A failed profile publishes nothing; a
reader that goes by the manifest (cluster.storage.fetch_folder) gets the old report or the new
one, whole, as it does for an artifact. Nothing is written under the local working folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cluster.artifacts import write_manifest
from cluster.config import TandemConfig
from cluster.runtime import storage_root
from cluster.storage import Location, location, native, publish_folder
from profiling.advice import compare, recommendations
from profiling.inference_cost import (
    profile_inference,
    profile_served,
    serve_token,
)
from profiling.measure import (
    ProfileError,
    measure_machine,
    probe_serve_app,
)
from profiling.subject import REPORT_DIR, Subject, checked_dataset, find_subject, plan_for
from profiling.train_cost import (
    profile_training,
    run_measurements,
    zero_memory,
)
from training.data import split


@dataclass
class ProfileReport:
    """Where the report was written and what it says (`data` is profile.json).

    out_dir: a Path for a local folder, a Location (URI) in an object store; the paths below
    follow it (a Location reads with .read_bytes(), .exists())."""

    out_dir: Path | Location
    data: dict[str, Any]

    @property
    def json_path(self) -> Path | Location:
        return self.out_dir / "profile.json"

    @property
    def html_path(self) -> Path | Location:
        return self.out_dir / "profile.html"

    @property
    def html(self) -> Path | Location:
        """The same file as html_path; tandem/cli.py's `tandem profile` prints it under this name."""
        return self.html_path

    @property
    def plot_paths(self) -> dict[str, Path | Location]:
        return {name: self.out_dir / filename for name, filename in self.data["plots"].items()}

    def summary(self) -> Any:
        from profiling.report import summary

        return summary(self.data, self.out_dir)


def target_dir(config: TandemConfig, subject: Subject, out_dir: str | Path | Location | None) -> Location:
    """The report folder: out_dir, else beside the subject's artifact, else under storage; a path or a URI."""
    if out_dir is not None:
        return location(out_dir)
    if subject.run_dir is not None:
        return location(subject.run_dir) / REPORT_DIR
    if subject.artifact_dir is not None:
        return location(subject.artifact_dir).parent / REPORT_DIR
    return storage_root(config) / config.name / f"{REPORT_DIR}-untrained"


def write_report(target: Location, build: Callable[[Path], None]) -> None:
    """A local folder: write_atomically. An object store: `build` fills a local temp folder, which
    gets a manifest and is published file by file with the manifest last (publish_folder), so a
    failing build publishes nothing and the manifest only ever lists files already complete."""
    if not target.remote:
        write_atomically(target.path, build)
        return
    if target.is_file():
        raise ProfileError(f"{target} exists and is not a folder; pass another out_dir (--out)")
    with tempfile.TemporaryDirectory(prefix="tandem-profile-") as staging:
        build(Path(staging))
        write_manifest(Path(staging), {"kind": "profile"})
        publish_folder(Path(staging), target)


def write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """`build` fills a hidden temp folder beside `target`, which then replaces `target` whole.

    Same filesystem, so each step is a rename; an existing report is moved aside only once the
    new one is complete, and removed after. Any failure removes the temp folder and leaves
    `target` as it was.
    """
    if target.exists() and not target.is_dir():
        raise ProfileError(f"{target} exists and is not a folder; pass another out_dir (--out)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(staging)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            if old is not None:
                os.rename(old, target)  # put the earlier report back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def profile(
    config: TandemConfig,
    source: str | Path | None = None,
    out_dir: str | Path | Location | None = None,
    serve_url: str | None = None,
    quick: bool = False,
) -> ProfileReport:
    """Measure training and inference of the configured model here; write profile.json, profile.html and PNG plots.

    source: 'latest', a run folder or an artifacts folder, a path or a URI (None: the latest
    artifact, else the untrained model); out_dir: a folder or an object-store URI, default
    `<run>/profile/`; serve_url: a running Tandem Serve app, measured at concurrency 1 and 32;
    quick: fewer repetitions and batch sizes.
    """
    plan = plan_for(quick)
    subject = find_subject(config, source)
    dataset = checked_dataset(config, subject)
    train_set, val_set = split(dataset, config.data.val_fraction, config.data.seed)
    if serve_url:
        probe_serve_app(serve_url, val_set.x[0], token=serve_token(config))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    machine = measure_machine(devices, plan.gemm_size, plan.triad_elements, plan.peak_budget_s)
    training = profile_training(config, train_set, machine, plan)
    run = run_measurements(subject, training)
    inference = profile_inference(config, subject, train_set, val_set, machine, plan)
    served = profile_served(config, serve_url, val_set.x[0], plan) if serve_url else None
    zero = zero_memory(config, training["parameters"], subject)
    data = {
        "name": config.name,
        "config_hash": config.config_hash(),
        "quick": quick,
        "source": {
            "trained": subject.trained,
            "artifact_dir": str(subject.artifact_dir) if subject.artifact_dir else None,
            "run_dir": str(subject.run_dir) if subject.run_dir else None,
            "model": subject.manifest.get("model") or {"builder": config.model.builder, "args": config.model.args},
        },
        "machine": machine,
        "training": {**training, "run": run},
        "zero": zero,
        "inference": inference,
        "served": {"url": serve_url, "levels": served} if serve_url else None,
        "comparison": compare(training, inference),
        "recommendations": recommendations(config, training, inference, zero, machine, run, served),
        "notes": report_notes(subject, machine, training, zero, quick) + above_peak_notes(training, inference) + inference["notes"],
    }
    data["plots"] = {}
    target = target_dir(config, subject, out_dir)

    def build(folder: Path) -> None:
        from profiling.plots import PLOTS, draw_plots
        from profiling.report import write_html, write_json

        data["plots"] = dict(PLOTS)
        draw_plots(data, folder)
        write_json(data, folder / "profile.json")
        write_html(data, folder / "profile.html")

    write_report(target, build)
    return ProfileReport(out_dir=native(target), data=data)


def peak_notes(machine: dict[str, Any]) -> list[str]:
    """Say so when more threads measured slower than one: other processes held the cores."""
    notes = []
    single = {(p["device"], p["dtype"]): p["flops_per_s"] for p in machine["peaks"] if p["threads"] == 1}
    for peak in machine["peaks"]:
        one = single.get((peak["device"], peak["dtype"]))
        if peak["threads"] and peak["threads"] > 1 and one and peak["flops_per_s"] < one:
            notes.append(
                f"{peak['device']} {peak['dtype']} with {peak['threads']} threads measured slower than with one "
                f"({peak['flops_per_s'] / 1e9:.3g} vs {one / 1e9:.3g} GFLOP/s): other processes held the cores"
            )
    return notes


def above_peak_notes(training: dict[str, Any], inference: dict[str, Any]) -> list[str]:
    """A measurement above its measured peak means the peak run was disturbed, not that the engine beat the hardware."""
    above = [
        f"{e['label']} at batch {r['batch']} ({r['fraction_of_peak']:.0%})"
        for e in inference["engines"]
        for r in e["latency"]
        if (r["fraction_of_peak"] or 0) > 1
    ]
    if (training["fraction_of_peak"] or 0) > 1:
        above.insert(0, f"the training step ({training['fraction_of_peak']:.0%})")
    if not above:
        return []
    return [
        f"{len(above)} measurement(s) exceed the measured peak, e.g. {', '.join(above[:3])}: the peak's runs were slowed by other "
        "work on the machine, so fractions of peak and the roofline are unreliable here; profile again on an idle machine"
    ]


def report_notes(subject: Subject, machine: dict[str, Any], training: dict[str, Any], zero: dict[str, Any], quick: bool) -> list[str]:
    notes = []
    if quick:
        notes.append(
            "quick profile: small matrices and arrays, three batch sizes, short timings; peaks are rough and the triad "
            "arrays fit in cache (it measures cache, not DRAM, bandwidth)"
        )
    if not subject.trained:
        notes.append("profiled the untrained model built from the config: no trained artifact was found (pass --from RUN to profile one)")
    if machine["load_average"] > machine["cores"]:
        notes.append(
            f"the machine was busy while measuring (load average {machine['load_average']:.1f} on {machine['cores']} cores): "
            "peaks, step times and latencies are lower than on an idle machine"
        )
    notes += peak_notes(machine)
    notes.append(
        f"the training step is measured in this process on {training['threads'] or 'one GPU'} thread(s), without DeepSpeed's "
        "communication; epoch and run times are estimates from it"
    )
    run = zero.get("run")
    if run and run.get("parameters") and run["parameters"] != zero["parameters"]:
        notes.append(
            f"the run's model has {run['parameters']:,} parameters and the config's {zero['parameters']:,}: the measured "
            "bytes are compared with the formula for the run's model"
        )
    if run:
        notes.append(
            f"the run {run['source'].removesuffix('/metrics.jsonl')} trained with ZeRO-{run['stage']} (configured now: "
            f"ZeRO-{zero['configured_stage']}); its measured bytes sit at the ZeRO-{run['stage']} row"
        )
    if run and (run["workers"] != zero["workers"] or run["precision"] != zero["precision"]):
        notes.append(
            f"the run used {run['workers']} workers in {run['precision']}; the table is for the configured "
            f"{zero['workers']} workers in {zero['precision']}"
        )
    return notes
