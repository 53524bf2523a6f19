#!/usr/bin/env bash
# Run every pipeline stage in order (one process: fresh stages are skipped in well under a second).
#   ./run_all.sh                      the built-in demo (configs/demo.toml)
#   ./run_all.sh configs/ucf101_resnet101.toml
# decode -> extract-flow -> finetune rgb, flow -> extract-features -> train-head (STFN + baselines) -> ablate
# -> refine -> evaluate; prints the results table and the paths of the plots.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${1:-$repo/configs/demo.toml}
[ -f "$config" ] || { echo "error: config file $config not found" >&2; exit 2; }
"$repo/scripts/bootstrap.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "${PIPELINE_VENV:-$repo/.venv}/bin/pipeline" run-all --config "$config"
