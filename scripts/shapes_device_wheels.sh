#!/usr/bin/env bash
# The wheels scripts/train_shapes.sh installs on the device machine, whose image has torch, numpy, PIL, matplotlib,
# timm and tqdm but not the versions of the Hugging Face stack, Hydra and open_clip this project pins (pyproject.toml).
# Run here, in the repository root; .whl/ is ignored by git (.gitignore) and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d .whl \
    diffusers==0.42.1 transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 httpx2 httpcore2 hf-xet \
    safetensors==0.8.0 regex==2026.11.19 hydra-core==1.3.8 omegaconf==2.3.1 open_clip_torch==3.3.0 ftfy==6.3.1 \
    wcwidth==0.9.4 typer click
# antlr4-python3-runtime 4.9.3 (Hydra's parser) is published as a source archive only: build its pure-Python wheel.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
