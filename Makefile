# emi-study: `make study` and `make test` work on a fresh clone; everything they need is installed from here.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CUDA users: make study TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128 (any torch >= 2.1 works)
TORCH_INDEX ?=
PROFILE ?= synthetic
DEVICE ?=
STAMP := $(VENV)/.emi-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help env study test check-export nbtest pytest bench gpu-check publish lab browser sounds ffmpeg corpus clean

help:
	@echo "make study   - environment, synthetic corpus, every notebook headless, the study site"
	@echo "make test    - export/clean check, notebook tests, integration + browser tests"
	@echo "make bench   - the benchmarks notebook alone (bench JSON in its run directory)"
	@echo "make gpu-check - on a CUDA machine: the prepared GPU check (benchmarks/gpu-latest.{json,md})"
	@echo "make publish - the newest synthetic run's summary and benchmarks into study/latest.{json,md} and the README"
	@echo "make lab     - JupyterLab with the project's kernel"

env: $(STAMP)

$(STAMP): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name emi-study --display-name "emi-study (.venv)" >/dev/null
	touch $(STAMP)

corpus: env
	$(BIN)/emi_synth --profile $(PROFILE) --cache

study: env
	$(BIN)/emi_study --profile $(PROFILE) $(if $(DEVICE),--device $(DEVICE),)
	@echo "Study site: $$(readlink -f runs/$(PROFILE)-latest)/site/index.html"

# Chromium for the browser test: Debian's packages, installed when missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@chromium --version

# Real recorded speech for the loader/predictor tests: LibriVox sentences (pocketsphinx-testdata, 16 kHz) and spoken
# words + a noise recording (alsa-utils, 48 kHz); Debian's packages, installed when missing.
SOUNDS := /usr/share/pocketsphinx/test/data/librivox /usr/share/sounds/alsa/Front_Center.wav
sounds:
	@if ! ls $(SOUNDS) >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq pocketsphinx-testdata alsa-utils >/dev/null; \
	fi
	@ls $(SOUNDS) >/dev/null

# The ffmpeg program, for the test that holds the loader's decoding of videos to what `ffmpeg -ac 1 -ar 16000` gives
# (the reference code's step); Debian's package, installed when missing. The study itself decodes with PyAV.
ffmpeg:
	@if ! command -v ffmpeg >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg >/dev/null; \
	fi
	@ffmpeg -version | head -1

check-export: env
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	$(BIN)/python -c "from emi_nb.study import write_readme; write_readme()"
	@git diff --exit-code --stat -- emi_nb nbs README.md || { echo "nbdev_export/nbdev_clean/README generation changed files: commit the exported/cleaned versions"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- emi_nb nbs)" || { git status --short -- emi_nb nbs; echo "untracked files in emi_nb/ or nbs/"; exit 1; }

nbtest: env
	EMI_PROGRESS=off $(BIN)/nbdev_test --n_workers 2 --timing

pytest: env browser sounds ffmpeg
	$(BIN)/python -m pytest tests -n 2 --durations=15 -ra

test: check-export nbtest pytest

# Publishes benchmarks/latest.{json,md}; the README's ratios are the published study run's own (make publish).
BENCH_PARAMS ?= -p bench.reps=7 -p bench.p1_clips=4 -p bench.p1_seconds=6
bench: env
	$(BIN)/emi_study --profile $(PROFILE) --only 12 --no-site --run-dir runs/bench-$$(date +%Y%m%d-%H%M%S) -p bench.publish=true $(BENCH_PARAMS)

# On a CUDA machine (install a CUDA build first: make env TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128):
# exactness of the CUDA paths, throughput at the paper geometry, the paper recipe end to end; <= 8 min with the install.
GPU_CHECK_ARGS ?= --publish
gpu-check: env
	$(BIN)/emi_gpu_check $(GPU_CHECK_ARGS)

# Publishes the newest synthetic run's summary (study/latest.{json,md}) and regenerates the README; commit them afterwards.
publish: env
	$(BIN)/python -c "from emi_nb.study import publish_study, write_readme; print(*publish_study('runs/$(PROFILE)-latest'), sep='\n'); write_readme()"

lab: env
	$(BIN)/jupyter lab --notebook-dir=nbs --MappingKernelManager.default_kernel_name=emi-study $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf runs _docs _proc .pytest_cache
