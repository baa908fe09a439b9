#!/usr/bin/env bash
# Every GPU test and GPU benchmark of the project in one go, under 8 minutes, one JSON out.
#
#   bash benchmarks/gpu_check.sh            # results in ${OUT:-./gpu_results}/gpu_check.json
#
# Needs: a CUDA GPU, python with torch and CuPy (no internet needed).  Optional: DALI, found on
# PYTHONPATH or in /tmp/dali_site (without it the DALI rows are recorded as skipped and only the
# kernel numbers are measured).  The repository need not be installed: it is put on PYTHONPATH.
# Steps (each under its own timeout, so one hang cannot eat the budget):
#   1. environment (nvidia-smi, versions)                                     ~5 s
#   2. pytest -m gpu over tests/ (the kernel's and every other part's GPU tests)  <= 170 s
#   3. benchmarks/kernel_bench.py: fused kernel vs DALI ops, batch 256, 224 px    <= 180 s
#   4. benchmarks/throughput.py on the GPU (loader, dali vs cupy backend), if DALI  <= 90 s
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT_DIR="${OUT:-$REPO/gpu_results}"
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch" 2>/dev/null; then PY="$REPO/.venv/bin/python"
else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ -d /tmp/dali_site ] && export PYTHONPATH="$PYTHONPATH:/tmp/dali_site"
export PYTHONDONTWRITEBYTECODE=1
# The package imports OpenCV at module level (synth, visualize) but the kernel's tests and benchmark do not
# use it: where it is missing, a stub module lets the package import (its attributes raise AttributeError,
# tests needing OpenCV skip); env.json records "cv2_stub": true.
CV2_STUB=false
if ! "$PY" -c "import cv2" 2>/dev/null; then
  STUB_DIR="$(mktemp -d)"
  cat > "$STUB_DIR/cv2.py" <<'STUB'
"""Stand-in for a missing OpenCV (written by benchmarks/gpu_check.sh)."""
__version__ = "stub"


def __getattr__(name):
    raise AttributeError(f"OpenCV is not installed on this machine (cv2.{name}); gpu_check.sh put a stub here")
STUB
  export PYTHONPATH="$PYTHONPATH:$STUB_DIR"
  CV2_STUB=true
fi
export CV2_STUB
T0=$(date +%s)
KB_SECONDS="${KB_SECONDS:-3}"
echo "gpu_check: python=$PY out=$OUT_DIR"

# 1. environment
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"; } \
  > "$OUT_DIR/nvidia_smi.txt"
"$PY" - > "$OUT_DIR/env.json" 2>&1 <<'EOF'
import json, importlib, platform
import os
info = {"python": platform.python_version(), "platform": platform.platform(), "cv2_stub": os.environ["CV2_STUB"] == "true"}
for mod in ("torch", "cupy", "nvidia.dali", "numpy", "cv2", "torchvision", "pytest"):
    try:
        m = importlib.import_module(mod)
        info[mod] = getattr(m, "__version__", "?")
    except Exception as e:
        info[mod] = None
try:
    import torch
    info["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
except Exception as e:
    info["torch_cuda"] = f"error: {e}"
try:
    from dali_objcrop.kernels.cupy_backend import gpu_available
    info["cupy_gpu"] = gpu_available()
except Exception as e:
    info["cupy_gpu"] = f"error: {e}"
print(json.dumps(info))
EOF
cat "$OUT_DIR/env.json"

# 2. GPU tests (collection errors of modules needing absent packages must not stop the others)
S=$(date +%s)
timeout 170 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
  --junitxml="$OUT_DIR/pytest_gpu.xml" -o junit_family=xunit1 > "$OUT_DIR/pytest_gpu.log" 2>&1
PYTEST_RC=$?
PYTEST_S=$(( $(date +%s) - S ))
tail -n 25 "$OUT_DIR/pytest_gpu.log"

# 3. kernel benchmark
S=$(date +%s)
timeout 180 "$PY" benchmarks/kernel_bench.py --batch 256 --size 224 --seconds "$KB_SECONDS" \
  --out "$OUT_DIR/kernel_bench.json" > "$OUT_DIR/kernel_bench.log" 2>&1
KB_RC=$?
KB_S=$(( $(date +%s) - S ))
tail -n 15 "$OUT_DIR/kernel_bench.log"

# 4. loader throughput on the GPU (DALI needed; its script belongs to the loader's part)
S=$(date +%s)
TP_RC=skipped
if [ -f benchmarks/throughput.py ] && "$PY" -c "import nvidia.dali" 2>/dev/null; then
  timeout 90 "$PY" benchmarks/throughput.py --devices gpu --modes obj-obj-dilate --batch-size 256 --threads 8 \
    --seconds 4 --reps 2 --warmup 2 --no-torchvision --json "$OUT_DIR/throughput_gpu.json" \
    > "$OUT_DIR/throughput_gpu.log" 2>&1
  TP_RC=$?
  tail -n 10 "$OUT_DIR/throughput_gpu.log"
fi
TP_S=$(( $(date +%s) - S ))

# one JSON with everything
PYTEST_RC=$PYTEST_RC KB_RC=$KB_RC TP_RC=$TP_RC PYTEST_S=$PYTEST_S KB_S=$KB_S TP_S=$TP_S T0=$T0 OUT_DIR="$OUT_DIR" \
"$PY" - <<'EOF'
import json, os, time
import xml.etree.ElementTree as ET
out = os.environ["OUT_DIR"]

def load(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except Exception as e:
        return {"unreadable": str(e)}

def tail(name, n=40):
    p = os.path.join(out, name)
    return open(p, errors="replace").read().splitlines()[-n:] if os.path.exists(p) else None

tests = []
p = os.path.join(out, "pytest_gpu.xml")
if os.path.exists(p):
    for case in ET.parse(p).getroot().iter("testcase"):
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, msg = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], \
                    (el.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": float(case.get("time") or 0), "message": msg})
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
gpu = open(os.path.join(out, "nvidia_smi.txt")).read().strip() if os.path.exists(os.path.join(out, "nvidia_smi.txt")) else None
result = {
    "gpu": gpu,
    "env": load("env.json"),
    "pytest_gpu": {"returncode": int(os.environ["PYTEST_RC"]), "seconds": int(os.environ["PYTEST_S"]),
                   "counts": counts, "tests": tests, "log_tail": tail("pytest_gpu.log", 30)},
    "kernel_bench": {"returncode": int(os.environ["KB_RC"]), "seconds": int(os.environ["KB_S"]),
                     "result": load("kernel_bench.json"), "log_tail": tail("kernel_bench.log", 20)},
    "throughput_gpu": {"returncode": os.environ["TP_RC"], "seconds": int(os.environ["TP_S"]),
                       "result": load("throughput_gpu.json"), "log_tail": tail("throughput_gpu.log", 10)},
    "total_seconds": int(time.time()) - int(os.environ["T0"]),
}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"gpu_check: tests {counts}; kernel_bench rc {os.environ['KB_RC']}; "
      f"{result['total_seconds']} s; wrote {os.path.join(out, 'gpu_check.json')}")
EOF
