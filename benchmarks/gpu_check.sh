#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): step MFU, Ray Data feed rate, a short
# pretrain run of the paper's config; one JSON in DIR.
#   bash benchmarks/gpu_check.sh [--dry-run] [--compile] --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
