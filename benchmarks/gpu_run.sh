#!/usr/bin/env bash
# On the device machine, from the repository root: the carried wheels installed beside its own Python and torch,
# then benchmarks/gpu_trials.py with its results under $OUT (what comes back). Extra arguments go to the script.
#   run: command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 540
set -uo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_run: the wheels did not install: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python3 benchmarks/gpu_trials.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_trials.stdout"
