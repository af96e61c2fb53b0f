#!/usr/bin/env bash
# Every GPU check of issue 10 in one short run: install, build data, GPU tests, GPU benchmarks.
#
#   benchmarks/gpu_suite.sh OUT_DIR [--device cuda|cpu] [--quick]
#
# Writes to OUT_DIR: env.txt (machine, torch, GPU), tests.txt (the GPU tests), and one table per
# benchmark (model.txt, scan.txt, scan_bf16.txt, data_path.txt, object_store.txt, storage.txt;
# .json next to most),
# plus summary.txt (exit status of every step). With --device cpu (or when torch sees no CUDA
# GPU) the CUDA-only parts are skipped and say so in summary.txt; everything else runs on CPU,
# which is how this script is tested on machines without a GPU. --quick shrinks the data (a
# smoke test of the script itself, not figures).
#
# Install: uses ./.venv if it exists, else $PYTHON (default python3) with `pip install -e
# '.[test,bench]'` (the GPU build of torch must already be installed there: the GPU machine
# reaches no package index; pip only links lenscan and checks what is missing).
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--device cuda|cpu] [--quick]}
shift
DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
step() {  # step NAME TIMEOUT_S CMD...: run, tee to OUT/NAME.txt, record the exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$SUMMARY"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "   $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
  "$PY" -m pip install --no-build-isolation -e '.[test,bench]' > "$OUT/install.txt" 2>&1 \
    || "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/install.txt" 2>&1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

{
  date -u
  uname -a
  nproc
  uptime
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DEVICE" = cuda ] && [ "$HAS_CUDA" != 1 ]; then
  echo "SKIPPED: CUDA parts (torch sees no CUDA GPU); running the CPU versions instead" \
    | tee -a "$SUMMARY"
  DEVICE=cpu
fi
if [ "$DEVICE" = cpu ]; then
  echo "SKIPPED: test_gpu_scan_matches_cpu, pinned-memory copies, torch.compile (CUDA only)" \
    | tee -a "$SUMMARY"
fi

NPROC=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")  # nproc obeys OMP_NUM_THREADS
if [ "$QUICK" = 1 ]; then
  TILES=2; TILE=2048; SIZE=2048; N=2048; ROUNDS=1
else
  TILES=16; TILE=4096; SIZE=8192; N=65536; ROUNDS=2
fi
COMPILE=()
[ "$DEVICE" = cuda ] && COMPILE=(--compile)

step tests 900 "$PY" -m pytest -q -p no:logging tests/test_scan_speed.py \
  tests/test_storage_options.py "tests/test_scan.py::test_gpu_scan_matches_cpu"
step model 600 "$PY" benchmarks/bench_model.py --device "$DEVICE" --n "$N" \
  --threads "$NPROC" "${COMPILE[@]}" --json "$OUT/model.json"
WORKERS=2
[ "$DEVICE" = cuda ] && WORKERS=1
SURVEY="$OUT/scan-survey.zarr"  # built once, scanned by every scan step
step scan_survey 900 "$PY" -c "from lenscan.simulate import make_survey
make_survey('$SURVEY', n_tiles=$TILES, seed=1, tile_size_pix=$TILE, galaxies_per_arcmin2=2.6)"
# fp32 (the default), then bf16 autocast (+ torch.compile once per worker on CUDA): the GPU
# worker's reader threads, pinned staging buffers and non-blocking copies are on in both.
step scan 1200 "$PY" benchmarks/bench_scan.py --survey "$SURVEY" --device "$DEVICE" \
  --workers "$WORKERS" --rounds "$ROUNDS" --json "$OUT/scan.json"
step scan_bf16 1200 "$PY" benchmarks/bench_scan.py --survey "$SURVEY" --device "$DEVICE" \
  --workers "$WORKERS" --rounds "$ROUNDS" --precision bf16 "${COMPILE[@]}" \
  --json "$OUT/scan_bf16.json"
rm -rf "$SURVEY"
CORES=0
step data_path 900 "$PY" benchmarks/bench_data_path.py --size "$SIZE" --cores "$CORES" \
  --json "$OUT/data_path.json"
if [ "$NPROC" -ge 16 ]; then
  step data_path_16 900 "$PY" benchmarks/bench_data_path.py --size "$SIZE" \
    --cores "$(seq -s, 0 15)" --layouts 32:2048,128:2048 --json "$OUT/data_path_16.json"
fi
step object_store 600 "$PY" benchmarks/bench_object_store.py --size "$SIZE"
step storage 900 "$PY" benchmarks/bench_storage.py --size "$SIZE" --json "$OUT/storage.json"
echo "tables in $OUT" | tee -a "$SUMMARY"
