# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and
# installs the project with the pins of constraints.txt, torch first and exactly, from PyTorch's CPU
# index (PyPI's torch is the multi-GB CUDA build on Linux; `make TORCH_INDEX=...` picks another).
# --retries 1: where that index is unreachable (an offline mirror with the wheel in its find-links),
# pip falls back at once instead of retrying for a minute.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
# setuptools' notice on every editable install ("be careful with folders ... same name"): chatter in `make demo`.
QUIET_BUILD := PYTHONWARNINGS=ignore::UserWarning
STAMP   := .venv/.installed
BENCH_STAMP := .venv/.installed-bench
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-fast lint docs bench reliability clean install gpu-wheels gpu-check

$(PY):
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

# Reinstall only when the pins or the project metadata change: a second run is fast.
$(STAMP): $(PY) constraints.txt pyproject.toml
	$(PIP) install -q --retries 1 -c constraints.txt --index-url $(TORCH_INDEX) "$$(grep '^torch==' constraints.txt)"
	$(QUIET_BUILD) $(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	.venv/bin/tandem run

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	.venv/bin/ruff check .

# The docs site (docs/, mkdocs.yml) into site/; strict: a broken link or a page missing from the nav fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict -d site/

# The benchmarks' peers too (the `bench` extra: LitServe), with the same pins.
$(BENCH_STAMP): $(STAMP)
	$(QUIET_BUILD) $(PIP) install -q -c constraints.txt -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

# Rerun the fault, fuzz, overload and soak tests and rewrite RELIABILITY.md from their figures.
reliability: $(STAMP)
	$(PY) -m benchmarks reliability

# What the GPU machine lacks (DeepSpeed, pydantic and their pure-Python needs; it has Python 3.12
# and no network), as wheels in gpu-wheels/: DeepSpeed built here from its pinned source (pure
# Python), the rest downloaded at this venv's versions for CPython 3.12 on manylinux.
GPU_WHEELS := gpu-wheels
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP) wheel -q --no-deps -w $(GPU_WHEELS) "$$(grep '^deepspeed==' constraints.txt)"
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $$($(PY) -m tests.gpu.gpu_check --wheel-pins)
	$(PY) -m tests.gpu.gpu_check --check-wheels $(GPU_WHEELS)

# The CUDA paths in one run (docs/guides/gpu.md, "Checking the GPU paths"); without CUDA it says so and exits 0.
# `make gpu-check GPU_CHECK_ARGS=--dry-run` runs the checks on the CPU. The GPU machine has no
# .venv: its own python3 runs the checks there.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) -m tests.gpu.gpu_check --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

# Deletes the virtual environment, the caches and runs/: every model trained under the default storage.
clean:
	rm -rf .venv .cache runs site
