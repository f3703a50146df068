# Two commands for a new machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-fast lint format demo clean gpu-wheels

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "tensorflow-serving-api>=2.21,<2.22"
	# PyTorch reference checks: the CPU wheel (pinned: an unpinned torch pulls a CUDA build),
	# timm without its torchvision requirement (bench/timm_import.py explains), its other deps.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps "timm>=1.0.20"
	$(PY) -m pip install -q huggingface_hub pyyaml pillow
	# kimm: the Keras peer in `python -m bench` (pure Python; its only dependency is keras).
	$(PY) -m pip install -q --no-deps "kimm==0.2.5"
	# int8 SavedModels (export.savedmodel --precision int8): Intel Neural Compressor requires
	# `tensorflow` by name, so it goes in without deps beside tensorflow-cpu; it still imports
	# pkg_resources (setuptools < 81).
	$(PY) -m pip install -q prettytable py-cpuinfo pydantic "setuptools<81"
	$(PY) -m pip install -q --no-deps "neural-compressor-tf==3.10"
	touch $(STAMP)

# Real images for the export and training tests (Debian package, works offline afterwards).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
$(FASHION_MNIST):
	(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  (echo "Could not install dataset-fashion-mnist: run 'apt-get install dataset-fashion-mnist' as root." && exit 1)

# Two workers, a test file each at a time (module fixtures are built once per file).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test: install $(FASHION_MNIST)
	$(PYTEST) tests

# The unit tier for day-to-day work (tests marked `slow` left out); CI runs `make test`.
test-fast: install $(FASHION_MNIST)
	$(PYTEST) -m "not slow" tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: install $(FASHION_MNIST)
	$(PY) demo.py

# Wheels a GPU machine with JAX, PyTorch and timm (Python 3.12) but no Keras needs: docs/gpu.md.
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl keras==3.15.1 namex optree

clean:
	rm -rf $(VENV) demo_output .pytest_cache
