# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing and
# installs the project with the pins of constraints.txt (torch first: a bare torch would be CUDA).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-fast lint bench reliability clean install

$(PY):
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

# Reinstall only when the pins or the project metadata change: a second run is fast.
$(STAMP): $(PY) constraints.txt pyproject.toml
	$(PIP) install -q -c constraints.txt "$$(grep '^torch==' constraints.txt)"
	$(PIP) install -q -c constraints.txt -e ".[test]"
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

bench: $(STAMP)
	$(PY) -m benchmarks

# Rerun the fault, fuzz, overload and soak tests and rewrite RELIABILITY.md from their figures.
reliability: $(STAMP)
	$(PY) -m benchmarks reliability

clean:
	rm -rf .venv .cache runs
