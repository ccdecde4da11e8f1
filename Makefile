# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= var/demo
STAMP := $(VENV)/.installed-stamp
# $(call timed,WHAT,COMMAND): say what a stage does, run it, then say how long it took.
timed = @t=$$(date +%s); printf '\n== %s\n' "$(1)"; $(2) && echo "   done in $$(( $$(date +%s) - t )) s"
EXTRAS := .[test,ray]

.PHONY: serve test test-gpu gpu-check srcpath install demo bench stubs lint clean

# torch first and pinned: that exact CPU wheel is on local disk; anything looser pulls GBs of CUDA.
# loraserve carries the contract and the clients (pyclient/) under its one import name.
$(STAMP): pyproject.toml
	$(call timed,install 1/3: a virtual environment in $(VENV),$(PYTHON) -m venv $(VENV))
	$(call timed,install 2/3: torch 2.13.0 (CPU wheel),$(PY) -m pip install --quiet torch==2.13.0)
	$(call timed,install 3/3: loraserve with its test and Ray extras: the longest stage,\
		$(PY) -m pip install --quiet -e '$(EXTRAS)')
	@touch $(STAMP)

install: $(STAMP)

$(DEMO)/adapters/registry.json: | $(STAMP)
	@printf '\n== demo: train the demo model and adapters into $(DEMO) (first time only)\n'
	@$(VENV)/bin/loraserve demo build --out $(DEMO)

demo: $(DEMO)/adapters/registry.json

serve: $(STAMP) $(DEMO)/adapters/registry.json
	@printf '\n== serve: loading the model; a line says how to try it once it is serving (Ctrl-C stops)\n'
	@$(VENV)/bin/loraserve serve --model-path $(DEMO)/base --adapters-dir $(DEMO)/adapters

test: $(STAMP)
	$(PY) -m pytest -q

# Only the tests that need a CUDA device (docs/performance.md "Running the suite on CUDA"). The CUDA machine
# has no venv: there, `make test-gpu PY=python3`.
test-gpu:
	$(PY) -m pytest -q -m gpu

# On the offline CUDA machine, one command of under 9 minutes (docs/performance.md "Running the suite on CUDA";
# tools/gpu_check.py): the gpu tests, the decode kernel (FlexAttention, CUDA graphs), kvcap and the
# 1b preset at batch 1/32/128; writes $(OUT) (default var/gpu-check). Without a venv it uses python3
# and sources .gpu/env.sh when the carried wheels are not importable yet. Never part of `make test`.
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check: $(if $(wildcard $(PY)),,srcpath)
	@if [ ! -x $(PY) ] && [ -f .gpu/env.sh ] && ! python3 -c 'import grpc_health.v1, bitsandbytes' 2>/dev/null; \
	then . .gpu/env.sh; fi; \
	$(if $(wildcard $(PY)),,PYTHONPATH=$(CURDIR)/$(SRCPATH)$${PYTHONPATH:+:$$PYTHONPATH}) \
	$(GPU_PY) -m loraserve.tools.gpu_check --out $(or $(OUT),var/gpu-check) $(GPU_CHECK_ARGS)

# Where nothing is installed (the offline CUDA machine): $(SRCPATH)/loraserve links the checkout's folders
# under their import names, so `PYTHONPATH=$$PWD/$(SRCPATH)` imports loraserve.* from this checkout.
SRCPATH := var/srcpath
srcpath:
	@mkdir -p $(SRCPATH)/loraserve
	@for f in __init__.py contract.py py.typed v1; do ln -sfn $(CURDIR)/pyclient/loraserve/$$f $(SRCPATH)/loraserve/$$f; done
	@ln -sfn $(CURDIR)/pyclient/clients $(SRCPATH)/loraserve/clients
	@for room in server scheduler runner registry tools; do ln -sfn $(CURDIR)/$$room $(SRCPATH)/loraserve/$$room; done

# The performance benchmark (docs/performance.md); writes var/bench/bench.json and bench.png.
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
