"""The `tandem` command and what it drives: one verb per stage over the library functions.

- cli.py        the verbs (train, tune, export, serve, run, profile, submit, k8s, check, ...)
- pipeline.py   `tandem run`: train or tune -> export -> serve -> check -> load -> summary
- submit.py     `tandem submit` / `tandem jobs`: stages as Ray jobs on a running cluster
- k8s.py        `tandem k8s`: KubeRay RayCluster / RayJob / RayService manifests
- checks.py     pre-deploy checks for job submission and Kubernetes
- reference.py  docs' config reference and benchmark tables, generated

May import: every package (this is the top layer); nothing imports it.
"""
