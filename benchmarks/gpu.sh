#!/usr/bin/env bash
# Runs the GPU-scale benchmarks in float32 and then float64, in one go, and
# writes them under benchmarks/results/gpu/ and benchmarks/results/gpu-x64/.
#
#   bash benchmarks/gpu.sh [extra run.py arguments, e.g. --cases dense]
#
# Uses $PYTHON (default: .venv/bin/python if present, else python). lineax is
# imported from this checkout's src/ (PYTHONPATH=src first), never from an
# installed copy; the path is printed and recorded in results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# Let XLA allocate as it needs instead of preallocating 75% of the card, so a
# large case cannot starve the next one; timings are of the compiled calls.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

"$PYTHON" - <<'PY'
import jax, lineax
print("lineax:", lineax.__file__)
print("jax", jax.__version__, "devices:", [d.device_kind for d in jax.devices()])
if jax.devices()[0].platform != "gpu":
    raise SystemExit("no GPU visible to JAX: install jax[cuda12] (or cuda13)")
PY

"$PYTHON" benchmarks/run.py --scale gpu --out benchmarks/results/gpu "$@"
"$PYTHON" benchmarks/run.py --scale gpu --x64 --out benchmarks/results/gpu-x64 "$@"
