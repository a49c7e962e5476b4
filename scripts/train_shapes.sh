#!/usr/bin/env bash
# One budgeted call of the shapes-world training on the device machine (one H200), resuming what earlier calls made:
#
#   here:   bash scripts/shapes_device_wheels.sh        # once: the wheels the device image lacks, into .whl/
#   device: run(command="EVALKIT_COMMIT=<git rev-parse HEAD here> bash scripts/train_shapes.sh",
#               carry=[".whl", "outputs/train_world/shapes"], timeout_s=600)
#   here:   cat <files_at>/shapes-run.tar.part-* | tar xf -   # the run folder, and weights/shapes-sd/ once finished
#
# The training stops itself, checkpointed, after MAX_MINUTES (default 8) of a 10-minute call; the next call, with
# the run folder carried back, resumes from that checkpoint. The run folder and the export come back through $OUT
# as tar parts of 15 MB (the device tool returns at most 8 files of 16 MB). Extra arguments are Hydra overrides.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m evalkit train-world max_minutes="${MAX_MINUTES:-8}" num_workers="${NUM_WORKERS:-14}" \
    commit="${EVALKIT_COMMIT:-null}" "$@"
status=$?
parts=()
for path in outputs/train_world/shapes weights/shapes-sd; do
    [ -e "$path" ] && parts+=("$path")
done
if [ -n "${OUT:-}" ] && [ ${#parts[@]} -gt 0 ]; then
    tar cf - --exclude=hydra "${parts[@]}" | split -b 15m - "$OUT/shapes-run.tar.part-"
    ls -l "$OUT"
fi
exit $status
