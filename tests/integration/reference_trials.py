"""What a FIFO search would find, without running one: every configuration trained to the end.

A FIFO search trains every sampled configuration for all its epochs, so its cost is a constant
(configurations x epochs) and its best is the best of those full runs. Here each configuration
is trained by the same per-worker loop a trial runs (training.loop.run_worker, one rank, gloo,
DeepSpeed) in one plain process, one after another: seconds in all instead of a Tune search's
minutes of Train start-ups. The ASHA test compares with it, and checks that the trials ASHA
let finish reached the same final metric, so the reference is the trials' own training.

Run: python -m tests.integration.reference_trials CONFIG_YAML UPDATES_JSON OUT_JSON
(UPDATES_JSON: a list of dotted-path updates, one configuration each).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from tests.gpu.gpu_check import LocalSession, free_port

    config_path, updates_path, out_path = argv
    # As in a Train worker (training/trainer.py worker_env): one intra-op thread, the CPU accelerator.
    os.environ.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    import tempfile

    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from cluster.config import config_with, load_config
    from training.loop import run_worker

    dist.init_process_group("gloo", rank=0, world_size=1)
    base = load_config(Path(config_path))
    finals = []
    for updates in json.loads(Path(updates_path).read_text()):
        config = config_with(base, {**updates, "training.workers": 1})
        with tempfile.TemporaryDirectory() as folder:
            session = LocalSession(rank=0, world_size=1, local_rank=0, checkpoint_root=Path(folder))
            run_worker({"config": config.to_dict(), "use_gpu": False}, session)
        finals.append({"updates": updates, "final": {k: v for k, v in session.reports[-1].items() if isinstance(v, int | float)}})
    dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(finals))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
