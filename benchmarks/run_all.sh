#!/usr/bin/env bash
# Full GPU sweep into benchmarks/results/ (see run_all.py --help). Extra arguments pass through, e.g.
#   benchmarks/run_all.sh --ops masked-attention
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/run_all.py "$@"
