"""`tandem profile`: what training and inference of the configured model cost on this machine.

- profile.py         profile(): the phases, the notes and the atomic write of the report
- subject.py         what is profiled (an artifact, or the untrained model) and the plan
- train_cost.py      FLOPs, a timed step, epoch and run time, ZeRO 0-3 memory per rank
- inference_cost.py  latency per batch, throughput and memory of every engine; a running app
- measure.py         machine peaks, FLOP counts, timings, the served load (serving.loadgen)
- advice.py          comparison and recommendations; plots.py PNGs; report.py JSON, HTML, tables

May import: `cluster`, `training`, `serving` and `serving.optimize` (it spans training and
inference); nothing below it imports profiling.
"""
