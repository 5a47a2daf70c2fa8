#!/usr/bin/env bash
# Every GPU row of issue 17 in two short calls on a CUDA machine that has the repository (and, where
# the machine has no network, the wheels of bench/device_wheels.sh in .whl/), run from the repo root:
#
#   bench/gpu_session.sh OUTDIR 1     # the acceptance rows: make test-gpu's scan tests, then the
#                                     # Bi-Mamba scan paths vs mambapy, the GEMM rate, encoder MFU
#   bench/gpu_session.sh OUTDIR 2     # the rest: kernel launch-shape sweep, e2e steps, make test-gpu
#
# Everything it writes goes to OUTDIR: the logs (part1.log, part2.log), environment.txt and
# benchmarks_gpu.md (docs/benchmarks_gpu.md with the measured sections replaced). Copy that file
# into docs/ before the second call, so that part 2 starts from part 1's rows. Each step runs under
# its own timeout (a part stays under 9 minutes) so that a hung step costs only itself. Exit status:
# 0 when every step passed. PYTHON (python3), WHEELS (.whl) and SITE (/tmp/site) may be set.
set -uo pipefail
out=${1:?usage: bench/gpu_session.sh OUTDIR 1|2}
part=${2:?usage: bench/gpu_session.sh OUTDIR 1|2}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
wheels=${WHEELS:-.whl} site=${SITE:-/tmp/site}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "gpu_session: installing $wheels failed"; exit 2; }
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}   # medfuse from the tree, no install
[ -f "$out/benchmarks_gpu.md" ] || cp docs/benchmarks_gpu.md "$out/benchmarks_gpu.md"
log="$out/part$part.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$python" - <<'EOF'
import platform, torch
try:
    import triton; tri = triton.__version__
except Exception as e:
    tri = f"not importable ({e})"
print(f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {tri}; "
      f"cuda available {torch.cuda.is_available()}")
import medfuse, monai, pydantic
print("medfuse imports; monai", monai.__version__, "pydantic", pydantic.__version__)
EOF
} 2>&1 | tee "$out/environment.txt"
status=0
step() {  # step SECONDS NAME COMMAND...: run one step under its own timeout, logging, never stopping the others
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc $(date -u +%H:%M:%S)" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
bench=("$python" bench/bench_gpu.py --out "$out/benchmarks_gpu.md")
case $part in
  1)
    step 120 "pytest -m gpu tests/ssm" "$python" -m pytest -q -m gpu -p no:cacheprovider tests/ssm
    step 240 "bench scan gemm" "${bench[@]}" --sections scan gemm
    step 150 "bench encoders" "${bench[@]}" --sections encoders
    ;;
  2)
    step 150 "bench sweep" "${bench[@]}" --sections sweep
    step 200 "bench e2e" "${bench[@]}" --sections e2e --text-arch "$wheels/minilm-arch"
    step 150 "bench tests (make test-gpu)" "${bench[@]}" --sections tests
    ;;
  *) echo "gpu_session: part is 1 or 2"; exit 2 ;;
esac
exit $status
