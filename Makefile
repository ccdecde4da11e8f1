# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= var/demo
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test test-gpu install demo bench stubs lint clean

# torch first and pinned: that exact CPU wheel is on local disk; anything looser pulls GBs of CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

$(DEMO)/adapters/registry.json: | $(STAMP)
	$(VENV)/bin/loraserve demo build --out $(DEMO)

demo: $(DEMO)/adapters/registry.json

serve: $(STAMP) $(DEMO)/adapters/registry.json
	$(VENV)/bin/loraserve serve --model-path $(DEMO)/base --adapters-dir $(DEMO)/adapters

test: $(STAMP)
	$(PY) -m pytest -q

# Only the tests that need a CUDA device (README "Running the suite on CUDA"). The CUDA machine
# has no venv: there, `make test-gpu PY=python3`.
test-gpu:
	$(PY) -m pytest -q -m gpu

# The performance benchmark (README "Performance"); writes var/bench/bench.json and bench.png.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(VENV)/bin/loraserve bench --out var/bench

stubs: $(STAMP)
	$(PY) proto/generate.py

# Proto lint with buf (npm package @bufbuild/buf); not part of `make test`.
lint:
	cd proto && npx --yes @bufbuild/buf@1.75.0 lint

clean:
	rm -rf $(VENV) var
