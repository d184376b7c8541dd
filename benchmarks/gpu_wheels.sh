#!/usr/bin/env bash
# The wheels benchmarks/gpu_trials.py needs on the device machine (Python 3.12, no network) beyond its image:
# rustbpe (the tokenizer's trainer), optuna and what it needs (SQLAlchemy, alembic, Mako, colorlog, greenlet).
# Run here, from the repository root; .whl/ is ignored by git and travels with `carry: [".whl"]` (about 7 MB).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
WHEELS=(rustbpe==0.1.0 optuna==5.0.0 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 colorlog==6.12.0 greenlet==3.5.6)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
ls -l .whl
