#!/usr/bin/env bash
# Create (or update) the project's virtual environment with the pinned dependencies.
#   .venv at the repository root by default; set PIPELINE_VENV to put it elsewhere.
# Re-running is cheap: it reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PIPELINE_VENV:-$repo/.venv}
python=${PYTHON:-python3}
want=$(sha256sum "$repo/pyproject.toml" | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.pipeline-stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
"$python" - <<'PY' || { echo "error: Python >= 3.10 is needed (found $("$python" --version 2>&1))" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
echo "Setting up $venv (torch, torchvision, OpenCV, PyAV, zarr, h5py; a few GB on first install) ..." >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test]" >"$venv/pip-install.log" 2>&1; then
  cat "$venv/pip-install.log" >&2
  echo "error: installing the dependencies failed (log: $venv/pip-install.log)" >&2
  exit 1
fi
echo "$want" > "$venv/.pipeline-stamp"
"$venv/bin/python" -c "import torch, torchvision, cv2, av, zarr, h5py; print('environment ready: torch', torch.__version__, '| torchvision', torchvision.__version__, '| OpenCV', cv2.__version__)" >&2
