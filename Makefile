# Every target creates its own virtual environment on first use, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a matching pair (PyPI's Linux build runs on CPU and CUDA alike).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Tests, the demo and the benchmark never reach the Hugging Face Hub.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: venv demo test lint bench reproduce clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The tiny Separate-and-Enhance finetune first (seconds; a re-run finds it finished) for the demo's separate_and_enhance row.
demo: venv
	$(OFFLINE) $(PY) -m evalkit finetune finetune=tiny_demo
	$(OFFLINE) $(PY) -m evalkit run experiment=demo

# The whole suite (`pytest -m "not slow"` is the quick inner loop), after the linter.
test: lint
	$(OFFLINE) $(PY) -m pytest -q

# ruff, configured in pyproject.toml
lint: venv
	$(PY) -m ruff check evalkit tests scripts datasets

# Ratios of the harness against diffusers, method overheads, scorer throughput, peak memory -> reports/bench/
bench: venv
	$(OFFLINE) $(PY) -m evalkit bench

# The shapes-world model, weights/shapes-sd/ (conf/train_world.yaml): on a GPU (about 15 minutes on an H200; on the
# device machine, scripts/train_shapes.sh). A re-run resumes, or re-exports a finished run; ARGS=... Hydra overrides.
.PHONY: train-shapes
train-shapes: venv
	$(OFFLINE) $(PY) -m evalkit train-world $(ARGS)

# `make reproduce-<table>` rebuilds one paper table (generate, score, report); `make reproduce` all of them.
# MODEL=tiny runs the same experiment on the tiny random-weight stand-ins, offline (numbers mean nothing);
# MODEL=<name> another model config; LIMIT=n the first n prompts; ARGS=... any further Hydra overrides.
EVALKIT = $(if $(filter tiny,$(MODEL)),$(OFFLINE)) $(PY) -m evalkit
REPRODUCE_ARGS = $(if $(filter tiny,$(MODEL)),stand_ins=true,$(if $(MODEL),model=$(MODEL))) $(if $(LIMIT),limit=$(LIMIT)) $(ARGS)
# On the stand-ins the four Stable Diffusion versions are one tiny model: it runs once.
TABLE3_MODELS = $(if $(filter tiny,$(MODEL)),sd14,sd14 sd15 sd2_base sd21_base)
# Separate-and-Enhance's targets finetune first; on the stand-ins, the tiny demo finetune.
SEPEN_FINETUNE = $(if $(filter tiny,$(MODEL)),finetune=tiny_demo,finetune=large_scale model=sd14)
REPRODUCE_TARGETS := reproduce-ar-table1 reproduce-ar-table2-fid reproduce-ar-table3-models reproduce-conform-ae \
	reproduce-sepen-eval reproduce-sepen-fid

.PHONY: $(REPRODUCE_TARGETS)
reproduce: $(REPRODUCE_TARGETS)

reproduce-ar-table1: venv
	$(EVALKIT) run experiment=ar_table1 dataset=densediffusion_coco $(REPRODUCE_ARGS)
	$(EVALKIT) run experiment=ar_table1 dataset=attend_and_excite $(REPRODUCE_ARGS)

reproduce-ar-table2-fid: venv
	$(EVALKIT) run experiment=ar_table2_fid $(REPRODUCE_ARGS)

reproduce-ar-table3-models: venv
	for model in $(TABLE3_MODELS); do $(EVALKIT) run experiment=ar_table3_models model=$$model $(REPRODUCE_ARGS) || exit 1; done

reproduce-conform-ae: venv
	$(EVALKIT) run experiment=conform_ae $(REPRODUCE_ARGS)

reproduce-sepen-eval: venv
	$(EVALKIT) finetune $(SEPEN_FINETUNE)
	$(EVALKIT) run experiment=sepen_eval $(REPRODUCE_ARGS)

reproduce-sepen-fid: venv
	$(EVALKIT) finetune $(SEPEN_FINETUNE)
	$(EVALKIT) run experiment=sepen_fid $(REPRODUCE_ARGS)

clean:
	rm -rf runs outputs multirun reports/demo
