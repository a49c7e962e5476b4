# Every target creates its own virtual environment on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a matching pair (PyPI's Linux build runs on CPU and CUDA alike).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Tests, the demo and the benchmark never reach the Hugging Face Hub.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: venv demo test bench reproduce clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The tiny Separate-and-Enhance finetune first (seconds; a re-run finds it finished) for the demo's sepen row.
demo: venv
	$(OFFLINE) $(PY) -m evalkit finetune finetune=tiny_demo
	$(OFFLINE) $(PY) -m evalkit run experiment=demo

test: venv
	$(OFFLINE) $(PY) -m pytest -q

# Ratios of the harness against diffusers, method overheads, scorer throughput, peak memory -> reports/bench/
bench: venv
	$(OFFLINE) $(PY) -m evalkit bench

clean:
	rm -rf runs outputs multirun reports/demo
