#!/usr/bin/env bash
# Run every pipeline stage in order; fresh stages are skipped.
#   ./run_all.sh                      the built-in demo (configs/demo.toml)
#   ./run_all.sh configs/ucf101.toml  another config
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${1:-$repo/configs/demo.toml}
"$repo/scripts/bootstrap.sh"
pipeline="${PIPELINE_VENV:-$repo/.venv}/bin/pipeline"
start=$(date +%s)
step() { echo "== pipeline $*" >&2; "$pipeline" "$@" --config "$config"; }

step decode

"$pipeline" status --config "$config"
echo "run_all: finished in $(( $(date +%s) - start )) s" >&2
