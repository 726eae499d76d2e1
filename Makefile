# The project's commands. Each one sets up what it needs (a cached ComfyUI 0.3.75 host, see dev/host.py).
PYTHON ?= python3
HOST := $(PYTHON) dev/host.py
PYTEST_ARGS ?=
# Test processes: each runs whole test files, with an equal share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup test lint demo serve bench-dci bench-train browser-setup

setup:  ## build (first run) or reuse the cached ComfyUI host; link this pack into .comfy/
	$(HOST) ensure

lint: setup  ## ruff, including the Comfy Registry's rules (S102, S307, E702)
	$(HOST) python -m ruff check .

browser-setup:  ## Debian's Chromium for the browser tests (where root and apt-get can install it; else they skip)
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "[browser] installing Debian's chromium for tests/e2e/test_browser.py"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	    >/dev/null 2>&1 || echo "[browser] could not install chromium; the browser tests will skip"; \
	else echo "[browser] no /usr/bin/chromium and no root apt-get to install it; the browser tests will skip"; fi

test: lint browser-setup  ## the whole test suite against the real ComfyUI (unit, in-process nodes, end-to-end server, browser)
	$(HOST) python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: setup  ## the main job, headless through a real ComfyUI server; prints where the outputs are
	$(HOST) python -m dev.demo

serve: setup  ## ComfyUI with this pack on 127.0.0.1:$${PORT:-8188}; extra flags in COMFY_ARGS
	$(HOST) serve

bench-dci: setup  ## DCI KSampler vs stock KSampler: time and peak-memory ratios (prints key=value lines last)
	$(HOST) python -m dev.bench_dci

.PHONY: bench-quality
bench-quality: setup  ## fidelity, editability and prompt accuracy of base / Custom Diffusion / ICO, plain and DCI sampling, on the toy model (key=value lines last; BENCH_ARGS for options)
	$(HOST) python -m dev.bench_quality $(BENCH_ARGS)

bench-train: setup  ## DCI Train Concept (ico) vs ComfyUI's Train LoRA: seconds per step and peak-memory ratios (key=value lines last)
	$(HOST) python -m dev.bench_train
