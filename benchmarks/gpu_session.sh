#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in ONE device call, most
# important first, each part time-boxed so the whole ends inside BUDGET seconds
# (default 540: a device session has 15 minutes in all, starting the machine included).
# Run from the repository root on the device machine:
#
#   bash benchmarks/gpu_session.sh            # all parts, in order, until the budget is spent
#   bash benchmarks/gpu_session.sh linear plain tests   # only these parts, in this order
#
# Parts (what each closes):
#   linear  LM heads (Llama-3, Gemma-2; bf16, N=8192): time / three-matmul floor, compiled
#           temp, peak, errors vs a float32 reference; Liger / CCE in a torch subprocess
#   plain   plain losses (N=8192 V=128256 bf16 and f32; N=65536 C=1000 f32) vs one
#           read+write pass; the Pallas forward; optax, naive jnp, torch F.cross_entropy
#   memory  compiled temp of "chunked", "lean" and "pallas" at N=8192 and 32768
#   tests   the kernel and loss tests, compiled on the GPU
#   sweep   block-size sweeps of "chunked" and "lean", tile sweeps of the Pallas kernels
#
# The device image has jax (CUDA), optax, chex, pytest, torch and triton but no
# network: Liger Kernel and cut-cross-entropy travel as wheels. Before the call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel cut-cross-entropy
# (pure-Python wheels: any platform flag works) and pass carry=[".whl"].
# Results land under $OUT (or runs/gpu): session.log (everything printed, with the
# seconds each part took), results.tar.gz (every JSON/Markdown/PNG), and the JSON of
# each part as soon as it is written. Copy them into benchmarks/results/<device>/ and
# commit them with this command line.
set -uo pipefail
out=${OUT:-runs/gpu}
budget=${BUDGET:-540}
quick=${QUICK:+--quick}  # QUICK=1: tiny shapes, to rehearse the script on a CPU
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(linear plain memory tests sweep)
res=$(mktemp -d)/gpu
mkdir -p "$out" "$res"
start=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX keeps half the GPU; the torch baselines run in a child process beside it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
log="$out/session.log"

left() { echo $((budget - ($(date +%s) - start))); }

# part NAME MAX_SECONDS COMMAND...: run COMMAND for at most MAX_SECONDS and never past
# the budget (20 s kept for packing the results); skipped when under 30 s remain.
part() {
  local name=$1 max=$2 t0 limit
  shift 2
  limit=$(($(left) - 20))
  ((limit > max)) && limit=$max
  if ((limit < 30)); then
    echo "=== $name: skipped, $(left) s of the budget left" | tee -a "$log"
    return
  fi
  echo "=== $name (at most $limit s): $*" | tee -a "$log"
  t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - t0)) s" | tee -a "$log"
}

keep() { # copy a part's JSON to $OUT at once (the tarball comes only at the end)
  [ -f "$1" ] && cp "$1" "$out/$2"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "liger|cut.cross|optax|chex" || true
} 2>&1 | tee -a "$log"

for p in "${parts[@]}"; do
  case "$p" in
    linear)
      part linear 300 python3 -m benchmarks --suite linear --shapes lm $quick --out "$res/linear"
      keep "$res/linear/results.json" linear.json
      ;;
    plain)
      part plain 150 python3 -m benchmarks --suite plain --shapes gpu $quick --out "$res/plain"
      keep "$res/plain/results.json" plain.json
      ;;
    memory)
      part memory 120 python3 -m benchmarks.memory --implementations chunked lean pallas \
        --out "$res/memory"
      ;;
    tests)
      # One worker: several would each take the GPU's memory.
      XLA_PYTHON_CLIENT_PREALLOCATE=false part tests 240 python3 -m pytest -q \
        -p no:cacheprovider tests/pallas tests/linear/test_api.py tests/test_categorical.py
      ;;
    sweep)
      part "sweep chunked" 150 python3 -m benchmarks.sweep chunked --heads gemma2 llama3 \
        --out "$res/sweep_chunked.json"
      part "sweep lean" 120 python3 -m benchmarks.sweep lean --out "$res/sweep_lean.json"
      part "sweep pallas" 150 python3 -m benchmarks.sweep pallas --heads llama3 gemma2 \
        --out "$res/sweep_pallas.json"
      part "sweep row_stats" 90 python3 -m benchmarks.sweep row_stats \
        --out "$res/sweep_row_stats.json"
      ;;
    *) echo "unknown part $p (linear plain memory tests sweep)" | tee -a "$log" ;;
  esac
done

tar -czf "$out/results.tar.gz" -C "$(dirname "$res")" gpu
echo "=== done after $(($(date +%s) - start)) s; results in $out" | tee -a "$log"
