#!/usr/bin/env bash
# Run the test suite (creating the environment first if needed). Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$repo/scripts/bootstrap.sh"
cd "$repo"
exec "${PIPELINE_VENV:-$repo/.venv}/bin/python" -m pytest -q "$@"
