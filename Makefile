# Two commands for a new machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "tensorflow-serving-api>=2.21,<2.22"
	# PyTorch reference checks: the CPU wheel (pinned: an unpinned torch pulls a CUDA build),
	# timm without its torchvision requirement (tests/torch_reference.py explains), its other deps.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps "timm>=1.0.20"
	$(PY) -m pip install -q huggingface_hub pyyaml pillow
	touch $(STAMP)

# Real images for the export and training tests (Debian package, works offline afterwards).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
$(FASHION_MNIST):
	(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	  (echo "Could not install dataset-fashion-mnist: run 'apt-get install dataset-fashion-mnist' as root." && exit 1)

test: install $(FASHION_MNIST)
	$(PY) -m pytest -q tests

demo: install $(FASHION_MNIST)
	$(PY) demo.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
