#!/usr/bin/env bash
# The worker engine's GPU checks, in one prepared run of at most 8 minutes on an H200.
#
#   bash bench/gpu_check.sh            # from the repository root; results in $OUT (or ./gpu_out)
#
# 1. Which python/torch/CUDA there is. No network is assumed: Python packages that are missing
#    are installed only from wheels in ./.whl (see below), else the script names them and
#    exits 2 at once. No CUDA device: exit 3.
# 2. tests/worker/test_cuda.py (at most 150 s): greedy text on cuda:0 (float32) equals the
#    CPU's, bf16 by default, per-request sampling and seeds, `--device cuda:N`; CUDA graphs
#    (fast path and the model's own code) and flex decode attention give the eager text; the
#    counter-based draw equals the CPU's; a decode step syncs with the host once.
# 3. bench/gpu_check.py (what is left of 7 minutes): four model shapes with random bf16 weights
#    (a 374M Llama, Qwen2.5-0.5B, Llama-3.2-1B, Qwen3-0.6B), 1/16/64 streams x 128 new tokens:
#    tok/s eager and as CUDA graphs, ms per step (forward/sampling/host), TTFT p50, peak
#    memory, capture time, greedy parity graphs vs eager, and transformers' continuous
#    batching at the same loads; table on stdout, JSON in $OUT/gpu_check.json.
# 4. If time is left: the same for one model with flex decode attention (gpu_check_flex.json).
#
# The GPU image has torch and transformers but may lack pydantic / pydantic-settings, which
# worker/ imports (shared/schemas.py, shared/settings.py). Carry them as wheels: here, once,
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     pydantic-settings==2.16.3 python-dotenv==1.2.4 typing_extensions==4.16.0
# (.whl/ is git-ignored) and name `.whl` in the device run's `carry`.
#
# GPU_CHECK_TINY=1 bash bench/gpu_check.sh: the same steps on a machine without a GPU (the CUDA
# tests skip, the check runs --tiny on CPU), to check the script itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-470}  # the whole run; the device session allows 480
status=0

echo "== environment"
"$PY" -c "import sys; print(sys.executable, sys.version.split()[0])"
"$PY" -c "import torch;print(torch.__version__, torch.cuda.is_available())" || {
    echo "torch is missing for $PY: nothing to run"; exit 2; }
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"

NEEDED="torch transformers tokenizers safetensors jinja2 msgpack numpy pydantic pydantic_settings pytest"
missing() {
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
absent=$(missing $NEEDED)
if [ -n "$absent" ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing: $absent; installing the wheels in .whl (no network)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    absent=$(missing $NEEDED)
fi
if [ -n "$absent" ]; then
    echo "missing Python packages: $absent (no network here: carry them as wheels in .whl)"
    exit 2
fi
CHECK_ARGS=""
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
    CHECK_ARGS="--tiny"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "no CUDA device visible"; exit 3
fi
"$PY" -c "import transformers, pydantic; print('transformers', transformers.__version__, \
'pydantic', pydantic.VERSION)"

echo "== CUDA tests (tests/worker/test_cuda.py)"
timeout 150 "$PY" -m pytest --noconftest -p no:cacheprovider -q -rs tests/worker/test_cuda.py \
    2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

left=$((BUDGET - SECONDS - 40))
echo "== engine check (bench/gpu_check.py), ${left} s left"
timeout "$left" "$PY" -m bench.gpu_check $CHECK_ARGS --deadline $((left - 90)) \
    --out "$OUT/gpu_check.json" 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model shards" | tee "$OUT/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

left=$((BUDGET - SECONDS))
if [ "$left" -gt 60 ]; then
    echo "== flex decode attention, one model (${left} s left)"
    timeout "$((left - 10))" "$PY" -m bench.gpu_check $CHECK_ARGS --models qwen2.5-0.5b \
        --decode-attention flex --no-cb --out "$OUT/gpu_check_flex.json" 2>&1 \
        | grep -v -e "Loading weights" -e "Writing model shards" | tee "$OUT/gpu_check_flex.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || echo "(flex run incomplete: not counted)"
fi

echo "== done in ${SECONDS} s: exit $status; results in $OUT"
exit $status
