#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in stages that each fit one
# device call (10 minutes). Run from the repository root on the device machine:
#
#   bash benchmarks/gpu_session.sh tests   # the kernel and loss tests, compiled on the GPU
#   bash benchmarks/gpu_session.sh bench   # python -m benchmarks --shapes gpu (+ torch baselines)
#   bash benchmarks/gpu_session.sh sweep   # compiled memory at the LM heads; tile / block sweeps
#
# The device image has jax (CUDA), optax, chex, pytest, torch and triton but no
# network: Liger Kernel and cut-cross-entropy travel as wheels. Before the first call,
# here: `python3 -m pip download --no-deps -d .whl liger-kernel cut-cross-entropy`
# and pass carry=[".whl"]. Results land under $OUT (or runs/gpu); copy them into
# benchmarks/results/<device>/ and commit them with the command that made them.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|bench|sweep}
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi; python3 -c "import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())"; } \
  2>&1 | tee "$out/environment.txt"

case "$stage" in
  tests)
    # On a GPU, implementation=None takes the Pallas kernel, so these run it compiled.
    timeout 540 python3 -m pytest -q -n 4 -p no:cacheprovider \
      tests/pallas tests/test_categorical.py tests/test_stable.py tests/linear/test_api.py \
      2>&1 | tee "$out/tests.log"
    ;;
  bench)
    timeout 560 python3 -m benchmarks --shapes gpu --out "$out/results" 2>&1 | tee "$out/bench.log"
    ;;
  sweep)
    timeout 150 python3 -m benchmarks.memory --out "$out/memory" 2>&1 | tee "$out/memory.log"
    for what in row_stats chunked lean; do
      timeout 140 python3 -m benchmarks.sweep "$what" --out "$out/sweep_$what.json" \
        2>&1 | tee "$out/sweep_$what.log"
    done
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
