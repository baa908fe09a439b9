#!/usr/bin/env bash
# The GPU-scale quality study (docs/gpu_quality.md): object-aware vs scene crops at GPU scale, and the loader's
# data wait.  On a lent GPU machine its run is the last step of the one budgeted run, benchmarks/gpu_run.sh
# (docs/gpu_run.md), with whatever time the earlier steps leave.  Three verbs, the same Python underneath
# (benchmarks/gpu_quality.py):
#
#   bash benchmarks/gpu_quality.sh prepare      # HERE (CPU), once, ~2-5 min: writes the git-ignored carry folder
#                                               # .carry/gpuq (<60 MiB): the 1,200 COCO photos at half size + the
#                                               # rewritten json, the BING store, 128 full-size photos, MANIFEST.json
#   bash benchmarks/gpu_quality.sh run          # ON THE GPU MACHINE, after the carry-dali parts, with
#                                               # carry [".carry/gpuq"]; results in $OUT (4 files); resumable
#   bash benchmarks/gpu_quality.sh dry-run --data=DIR --work=DIR --out=DIR
#                                               # the same run at toy scale on the CPU (tests/system/test_gpu_quality.py)
#
# Extra flags go to the Python verb (`python benchmarks/gpu_quality.py prepare|run --help`).
# DALI: found on PYTHONPATH or in /tmp/dali_site (where ../shared/tools/carry-dali installs it).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch" 2>/dev/null; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/dali_site ] && export PYTHONPATH="$PYTHONPATH:/tmp/dali_site"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export GPUQ_COMMAND="bash benchmarks/gpu_quality.sh $*"
verb="${1:-}"
[ $# -gt 0 ] && shift
case "$verb" in
  prepare) exec "$PY" benchmarks/gpu_quality.py prepare "$@" ;;
  run)     exec "$PY" benchmarks/gpu_quality.py run --profile=gpu "$@" ;;
  dry-run) exec "$PY" benchmarks/gpu_quality.py run --profile=toy "$@" ;;
  *) echo "usage: bash benchmarks/gpu_quality.sh prepare|run|dry-run [flags]  (docs/gpu_quality.md)" >&2; exit 2 ;;
esac
