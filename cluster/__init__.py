"""Tandem's foundation: the one configuration, connecting to Ray, artifacts, and the error base class.

Where things go:
- errors.py     TandemError, the base of every error a user can fix (the CLI prints it as one line)
- config/       pydantic models of every config section, loading, --set overrides, cross-field checks
- runtime.py    connect(config): local single-node, simulated multi-node, or an existing cluster;
                node group <-> Ray custom resource mapping, and the one runtime_env builder
- artifacts.py  run folders, manifests, checksums, atomic writes, loading a model artifact, versions
- tracking.py   experiment tracking (MLflow runs, TensorBoard event files), logged from the driver
- console.py    the long verbs' terminal: Tandem's lines on screen, everything else in the run's log
- tables.py     rich tables that stay readable in a log: one record per row where the table would be cut
- example.yaml  the packaged example (`tandem run` with no argument)

May import: nothing of Tandem's other packages (tests/unit/test_layering.py checks it). Every other
package builds on this one.
"""
