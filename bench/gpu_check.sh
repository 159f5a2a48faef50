#!/usr/bin/env bash
# The trainer benchmark on a CUDA machine: the 25 M policy in bf16 (mixed precision) with sdpa
# attention, TRL 1.16 (reward model in-process, on the GPU) against ours in sync and in async
# mode (reward service on the same GPU), 2 interleaved repeats x 20 timed steps. Finishes in
# under 8 minutes (killed at 8) and writes its table to the file named (default
# bench/results/gpu_check.md) and its JSON beside it. Without CUDA it stops at once, exit 2.
#
#     bench/gpu_check.sh [TABLE_FILE]        # PYTHON=.venv/bin/python by default
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TABLE=${1:-bench/results/gpu_check.md}
exec timeout 480 "$PYTHON" bench/bench_trainer.py \
    --device cuda --bf16 --attn-implementation sdpa --policy 25m \
    --steps 20 --warmup 5 --repeats 2 \
    --out "${TABLE%.*}.json" --table "$TABLE"
