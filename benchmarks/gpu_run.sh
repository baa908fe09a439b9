#!/usr/bin/env bash
# The one budgeted GPU run (docs/gpu_run.md): every GPU check and figure of the project in a fixed order, each
# step under its own deadline, each step's JSON kept as soon as it is written (a cut run keeps what it
# measured).  Two verbs, matching the lease's calls:
#
#   bash benchmarks/gpu_run.sh kernels        # (a) the DALI-free kernel check: nvcc + this repository only;
#                                             #     rides along with the first DALI carry call (~40 s)
#   bash benchmarks/gpu_run.sh main           # (b)-(e) once DALI is in /tmp/dali_site, with carry [".carry/gpuq"]
#   GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh main   # print the plan (steps, deadlines, commands), run nothing
#
# Steps of `main` (seconds: deadline of the step; the whole verb stops itself at GPU_RUN_TOTAL, default 420):
#   b1  the operators built here (g++ + nvcc for this GPU's architecture) and their first-use self-test   90
#   b2  every `gpu` test (pytest -m gpu), the CPU plugin tests                                            150
#   c   loader profile: decode-only vs the loader on the operators, batch 256, 224 px, MoCo-v2, real COCO
#       photos, hw_decoder_load 0 / 0.65 / 0.9 (benchmarks/gpu_profile.py)                                100
#   c2  the fused operator vs DALI's resize + colour + blur + normalise on images already on the GPU     60
#       (benchmarks/kernel_bench.py)
#   d+e the data wait (MoCo-v2 ResNet-50 bf16 batch 128, loader vs resident batch) and the quality cells
#       with whatever time remains, resumable across calls (benchmarks/gpu_quality.py run)           the rest
#   f   the multi-crop cells (scene-mc vs obj-mc, 6 local views) with what is left, usually a call of its
#       own: GPU_RUN_STEPS=gpu_quality_mc (benchmarks/gpu_quality.py run --settings=scene-mc,obj-mc)  the rest
# Results: $OUT (or ./gpu_run_out): gpu_run.json (every step: status, seconds, its JSON), logs.tar.gz.
# A rerun of some steps: GPU_RUN_STEPS=build_selftest,gpu_profile (GPU_RUN_PYTEST_ARGS adds pytest flags).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VERB="${1:-}"
DRY="${GPU_RUN_DRY:-0}"
OUT_DIR="${OUT:-$REPO/gpu_run_out}"
WORK="${GPU_RUN_WORK:-/tmp/gpu_run}"
DATA="${GPU_RUN_DATA:-$REPO/.carry/gpuq}"
TOTAL="${GPU_RUN_TOTAL:-420}"
mkdir -p "$OUT_DIR" "$WORK/logs" "$WORK/json"
T0=$(date +%s)
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/dali_site ] && export PYTHONPATH="$PYTHONPATH:/tmp/dali_site"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export DALI_OBJCROP_HOME="${DALI_OBJCROP_HOME:-$WORK/home}"
# on the lent machine only this GPU's architecture is built (the wheel's users get sm_75 and up + PTX)
if [ -z "${DALI_OBJCROP_CUDA_ARCHS:-}" ] && command -v nvidia-smi > /dev/null 2>&1; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')
  [ -n "$cc" ] && export DALI_OBJCROP_CUDA_ARCHS="$cc"
fi

# step NAME DEADLINE JSON CMD...: run CMD under min(DEADLINE, time left), log to $WORK/logs/NAME.log, then
# record the step (status, seconds, the JSON it wrote) into $OUT_DIR/gpu_run.json and pack the logs.
step() {
  local name="$1" secs="$2" json="$3"; shift 3
  # GPU_RUN_STEPS="a,b": a rerun of some steps only (the others keep their earlier results)
  if [ -n "${GPU_RUN_STEPS:-}" ] && [[ ",$GPU_RUN_STEPS," != *",$name,"* ]]; then return 0; fi
  local left=$(( TOTAL - ($(date +%s) - T0) ))
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$DRY" = "1" ]; then echo "[plan] $name: deadline ${secs}s -> ${json:-no json}: $*"; return 0; fi
  local s rc
  s=$(date +%s)
  if [ "$secs" -lt 5 ]; then
    rc="skipped (no time left)"
  else
    echo "[gpu_run] $name (deadline ${secs}s): $*"
    timeout --kill-after=10 "$secs" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    [ "$rc" = 124 ] && rc="timeout after ${secs}s"
  fi
  tail -n 12 "$WORK/logs/$name.log" 2>/dev/null
  record "$name" "$rc" "$(( $(date +%s) - s ))" "$json"
}

record() {
  "$PY" - "$OUT_DIR/gpu_run.json" "$1" "$2" "$3" "$4" "$WORK/logs/$1.log" <<'EOF'
import json, os, sys, time
out, name, rc, secs, js, log = sys.argv[1:7]
data = json.load(open(out)) if os.path.exists(out) else {"steps": {}}
try:
    result = json.load(open(js)) if js and os.path.exists(js) else None
except ValueError as e:
    result = {"unreadable": str(e)}
tail = open(log, errors="replace").read().splitlines()[-25:] if os.path.exists(log) else []
data["steps"][name] = {"status": "ok" if rc == "0" else rc, "seconds": int(secs), "result": result, "log_tail": tail,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
tmp = out + ".tmp"
json.dump(data, open(tmp, "w"), indent=1)
os.replace(tmp, out)
EOF
  tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$WORK" logs json 2>/dev/null && mv "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
}

env_json() {
  [ "$DRY" = "1" ] && { echo "[plan] env: nvidia-smi, versions -> $WORK/json/env.json"; return 0; }
  "$PY" - > "$WORK/json/env.json" 2> "$WORK/logs/env.log" <<'EOF'
import importlib, json, os, platform, subprocess
info = {"python": platform.python_version(), "cpus": os.cpu_count(),
        "cuda_archs": os.environ.get("DALI_OBJCROP_CUDA_ARCHS")}
try:
    info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                                  "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as e:
    info["gpu"] = f"none ({e})"
for mod in ("torch", "cupy", "nvidia.dali", "numpy", "cv2"):
    try:
        info[mod] = getattr(importlib.import_module(mod), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info[mod] = None
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    info["nvcc"] = None
print(json.dumps(info))
EOF
  cat "$WORK/json/env.json"
  record env 0 0 "$WORK/json/env.json"
}

case "$VERB" in
  kernels)
    env_json
    step kernel_check 120 "$WORK/json/kernel_check/crop_check.json" \
      bash csrc/check/run.sh --sanitize --out "$WORK/json/kernel_check"
    ;;
  main)
    if [ "$DRY" != "1" ] && [ ! -f "$DATA/MANIFEST.json" ]; then
      echo "gpu_run: $DATA/MANIFEST.json missing: run 'bash benchmarks/gpu_quality.sh prepare' here, carry .carry/gpuq" >&2
    fi
    env_json
    # b1: build for this GPU, then the self-test (its verdict and reason in the JSON)
    step build_selftest 90 "$WORK/json/selftest.json" "$PY" -c "
import json, sys
from dali_objcrop import plugin
from dali_objcrop.plugin import build, selftest
ok = plugin.load(cuda=True)
res = {'loaded': ok, 'error': plugin.error(), 'library': str(plugin._state.get('path')),
       'archs': build.cuda_archs(), 'gpu_op': ok and plugin.crop_op_registered('gpu')}
if res['gpu_op']:
    res['selftest_ok'], res['selftest_reason'] = selftest.run_selftest(0)
    res['crop_op_usable'] = list(plugin.crop_op_usable('gpu', 0))
json.dump(res, open('$WORK/json/selftest.json', 'w'), indent=1)
print(res)
sys.exit(0 if res.get('selftest_ok') else 1)"
    # b2: every gpu test (GPU op == CPU op, self-test, limits, GPU loaders, trainer); the kernel check's own test is
    # deselected: step (a) of the `kernels` verb ran it, with the sanitizers
    step pytest_gpu 150 "$WORK/json/pytest_gpu.json" bash -c "\"$PY\" -m pytest tests -m gpu -q -p no:cacheprovider \
      --continue-on-collection-errors -o junit_family=xunit1 --junitxml='$WORK/json/pytest_gpu.xml' \
      --deselect tests/operators/test_crop_gpu_path.py::test_kernel_check_on_the_gpu ${GPU_RUN_PYTEST_ARGS:-}; rc=\$?; \
      \"$PY\" benchmarks/junit_summary.py '$WORK/json/pytest_gpu.xml' '$WORK/json/pytest_gpu.json'; exit \$rc"
    # c: the loader profile on the carried real COCO photos (the 128 full-size photos listed 8 times, as links, so
    # that an epoch holds several batches of 256; the first hw_decoder_load is the one the later rows use)
    "$PY" -c "import importlib.util as u, pathlib as p, sys
s = u.spec_from_file_location('gq', 'benchmarks/gpu_quality.py'); m = u.module_from_spec(s); sys.modules['gq'] = m; s.loader.exec_module(m)
print(m.speed_data(p.Path(sys.argv[1]), p.Path(sys.argv[2]), 8))" "$DATA" "$WORK/profile_data" > /dev/null 2>&1
    step gpu_profile 100 "$WORK/json/gpu_profile.json" "$PY" benchmarks/gpu_profile.py \
      --coco "$WORK/profile_data/speed/instances.json" \
      --device gpu --batch 256 --size 224 --threads 8 --seconds 3 --warmup 3 --hw-decoder-load 0.9,0.65,0 \
      --json "$WORK/json/gpu_profile.json"
    # c2: the fused operator on images already on the GPU vs DALI's own stages
    step kernel_bench 60 "$WORK/json/kernel_bench.json" "$PY" benchmarks/kernel_bench.py --batch=256 --size=224 \
      --seconds=2 --images="$DATA/speed/images" --out="$WORK/json/kernel_bench.json"
    # d + e: data wait, then the quality cells until the deadline (resumable: finished cells are kept in /tmp)
    left=$(( TOTAL - ($(date +%s) - T0) - 15 ))
    step gpu_quality "$left" "$WORK/json/quality/gpu_quality.json" env OUT="$WORK/json/quality" \
      "$PY" benchmarks/gpu_quality.py run --profile=gpu --data="$DATA" --total-s="$(( left - 10 ))"
    # f: the multi-crop comparison's cells, in the same work folder (its own cells; resumable)
    left=$(( TOTAL - ($(date +%s) - T0) - 15 ))
    step gpu_quality_mc "$left" "$WORK/json/quality_mc/gpu_quality.json" env OUT="$WORK/json/quality_mc" \
      "$PY" benchmarks/gpu_quality.py run --profile=gpu --data="$DATA" --total-s="$(( left - 10 ))" \
      --settings=scene-mc,obj-mc
    ;;
  *)
    echo "usage: bash benchmarks/gpu_run.sh kernels|main   (docs/gpu_run.md; GPU_RUN_DRY=1 prints the plan)" >&2
    exit 2 ;;
esac
echo "gpu_run $VERB: $(( $(date +%s) - T0 )) s; $OUT_DIR/gpu_run.json"
