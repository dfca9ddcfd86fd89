"""cluster/console.py: which lines reach the terminal while a long verb is quiet, and which only the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cluster.console import tandem_line

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from cluster.console import move_log, quiet_terminal, terminal_out

    log = Path(sys.argv[1]) / "start.log"
    with quiet_terminal(log):
        print("[tandem] epoch   1/2  step 22")
        print("\\x1b[36m(RayTrainWorker pid=7)\\x1b[0m [tandem] resumed from x (tag t, step 44)")
        print("\\x1b[36m(TrainController pid=8)\\x1b[0m Reporting training result 1: TrainingReport(...)")
        print("2026-11-29 INFO worker.py -- Started a local Ray instance.", file=sys.stderr)
        os.write(2, b"[2026-11-29 E core_worker.cc] written below Python\\n")
        import warnings; warnings.warn("a library's FutureWarning", FutureWarning)
        import logging; logging.getLogger("tandem.cluster").warning("the local Ray missed its start-up deadline")
        (Path(sys.argv[1]) / "run").mkdir()
        move_log(Path(sys.argv[1]) / "run")
        terminal_out.write("artifact: written by the CLI\\n")
        print("a partial line without its newline", end="")
    print("after the block")
    """
)


def test_tandem_lines_reach_the_terminal_and_everything_reaches_the_log(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    terminal = done.stdout + done.stderr
    log = (tmp_path / "run" / "console.log").read_text()
    assert not (tmp_path / "start.log").exists()  # moved into the run folder
    # Tandem's lines, the forwarded one without Ray's prefix and colour (no TTY here).
    assert "[tandem] epoch   1/2  step 22\n" in done.stdout
    assert "[tandem] resumed from x (tag t, step 44)\n" in done.stdout
    assert f"[tandem] log of Ray, DeepSpeed and the workers: {tmp_path / 'run' / 'console.log'}" in done.stdout
    assert "artifact: written by the CLI" in done.stdout and "after the block" in done.stdout
    assert "[tandem] WARNING the local Ray missed its start-up deadline" in done.stderr  # Tandem's warnings stay on screen
    for chatter in ("Reporting training result", "Started a local Ray instance", "written below Python", "FutureWarning", "\x1b["):
        assert chatter not in terminal, chatter
        if chatter != "\x1b[":
            assert chatter in log, chatter
    assert "(RayTrainWorker pid=7)" in log and "a partial line without its newline" in log


def test_tandem_line_strips_rays_prefix_and_keeps_only_tandems_lines():
    assert tandem_line("[tandem] x") == "[tandem] x"
    assert tandem_line("(TrainController pid=3) [tandem] epoch 1") == "[tandem] epoch 1"
    assert tandem_line("\x1b[36m(RayTrainWorker pid=3, ip=10.0.0.1)\x1b[0m [tandem] y") == "[tandem] y"
    assert tandem_line("(RayTrainWorker pid=3) Setting up process group") is None
    assert tandem_line("INFO something [tandem] in the middle") is None
