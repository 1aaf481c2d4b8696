#!/usr/bin/env bash
# One short, prepared pass on a lent GPU: the GPU-scale benchmarks that have a
# GPU target, the 256^2 Kronecker case, and the test suite; every step has its
# own time limit so that a slow one cannot take the others' time, and the
# results end in one archive.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh            # on the GPU
#   SCALE=cpu QUICK=--quick bash benchmarks/gpu_check.sh     # dry run here
#
# lineax is imported from this checkout's src/ (printed first); the image's
# own copy of the published package is never used. The device image has no
# beartype (the tests' runtime type checking): carry its wheel and install it
# first, as /work/.library/device/README.md describes.
#
# Measured on an H200 (2026-11-26): the benchmarks take about 4 minutes, the
# tests 5 minutes with 14 workers (6-7 by now), so they go in two calls of under
# 10 minutes:
# `PARTS=bench` and then `PARTS=tests` (default: both). `X64=1` adds a float64
# pass of the benchmarks (not yet run on a GPU: the first session with one ran
# out of device time).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SCALE=${SCALE:-gpu}
QUICK=${QUICK:-}
OUTDIR=${OUT:-/tmp/gpu_check}
RES=/tmp/gpu_check_results
rm -rf "$RES" && mkdir -p "$RES" "$OUTDIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
LOG="$OUTDIR/log.txt"
step() { echo "=== $(date +%T) $*" | tee -a "$LOG"; }

step environment
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import importlib.metadata as md
import equinox, jax, jaxtyping, lineax
print("lineax:", lineax.__file__)
print("jax", jax.__version__, "equinox", equinox.__version__,
      "jaxtyping", jaxtyping.__version__, jax.devices())
for name in ("optimistix", "diffrax", "scipy", "numpy", "beartype"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PY

PARTS=${PARTS:-bench tests}
if [[ " $PARTS " == *" bench "* ]]; then
step "float32 dense, gradient and batch benchmarks"
timeout 150 "$PY" benchmarks/run.py --scale "$SCALE" $QUICK --out "$RES/bench-f32" \
  --cases 'grad_lstsq|grad_lu|dense_(lu|cholesky|qr)|vmap|many|tridiag' 2>&1 | tee -a "$LOG"

step "float32 Krylov benchmarks"
timeout 130 "$PY" benchmarks/run.py --scale "$SCALE" $QUICK --out "$RES/bench-f32-krylov" \
  --cases 'cg_poisson|bicgstab|gmres_convdiff_N256|gmres_convdiff_N64|lsmr' 2>&1 | tee -a "$LOG"

if [[ -n "${X64:-}" ]]; then
step "float64 dense, gradient and Krylov benchmarks"
timeout 200 "$PY" benchmarks/run.py --scale "$SCALE" $QUICK --x64 --out "$RES/bench-f64" \
  --cases 'grad_lstsq|grad_lu|dense_(lu|cholesky)_n1000|cg_poisson_N|bicgstab|gmres_convdiff_N256' \
  2>&1 | tee -a "$LOG"
fi

step "Kronecker benchmark"
timeout 80 "$PY" benchmarks/structured.py --cases kronecker \
  --kron "$([ "$SCALE" = gpu ] && echo 256 || echo 32)" $QUICK \
  --out "$RES/structured" 2>&1 | tee -a "$LOG"

fi

if [[ " $PARTS " == *" tests "* ]]; then
step "test suite"
# (`-p no:benchmark`: an image with pytest-benchmark warns under xdist, and the
# tests turn warnings into errors.) The suite took 298 s on the H200 when it had
# 1173 tests; it has grown by about a third since, so its limit is 540 s (in a
# 600-second call). The whole log goes into the archive, one line per test
# (`-v`), so that a run cut by its limit (no summary, no junit.xml) still says
# what passed and failed; its end is printed.
timeout "${TEST_TIMEOUT:-540}" "$PY" -m pytest -v -p no:cacheprovider -p no:benchmark \
  -n "${TEST_WORKERS:-14}" --dist loadfile --junitxml="$RES/junit.xml" \
  ${TESTS:-tests} > "$RES/pytest.log" 2>&1
tail -n 80 "$RES/pytest.log" | tee -a "$LOG"
fi

step done
tar -czf "$OUTDIR/results.tgz" -C "$RES" . 2>&1 | tee -a "$LOG"
