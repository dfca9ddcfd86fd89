"""Tandem's foundation: the one configuration, connecting to Ray, node groups, the CLI and artifacts.

Where things go:
- config.py     pydantic models of every config section, loading, --set overrides, cross-field checks
- runtime.py    connect(config): local single-node, simulated multi-node, or an existing cluster;
                node group <-> Ray custom resource mapping (one function, used everywhere)
- artifacts.py  run folders, manifests, checksums, atomic writes, loading a model artifact
- cli.py        the `tandem` verbs, each a few lines over a library function
- example.yaml  the packaged example (`tandem run` with no argument)
"""
