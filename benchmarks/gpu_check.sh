#!/usr/bin/env bash
# One-shot GPU check (run on a lent CUDA machine from the repository root): GPU/driver info,
#   the CUDA-marked tests of the zoo, bench_zoo on cuda, then the torch backend's equality
#   tests and bench_tests_backend (numpy on the CPU against torch on the GPU).
# It uses the first python that imports torch with CUDA (PYTHON=..., .venv, python3, python)
# and runs distsim from this checkout via PYTHONPATH (no install, no network needed); it
# needs numpy, scikit-learn, pytest and hypothesis next to that torch and says which are
# missing.
# DEVICE=cpu runs the same steps on a machine without a GPU, smaller (a rehearsal of the
# script itself: any python with torch; no CUDA-marked tests; bench_zoo on cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DEVICE="${DEVICE:-cuda}"
case "$DEVICE" in
  cuda) NEED="torch.cuda.is_available()" ;;
  cpu) NEED="True" ;;
  *) echo "DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac

PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c "import torch, sys; sys.exit(0 if $NEED else 1)" 2>/dev/null; then
    PY="$cand"; break
  fi
done
if [ "$DEVICE" = cuda ]; then echo "== nvidia-smi"; nvidia-smi || echo "(nvidia-smi not found)"; fi
if [ -z "$PY" ]; then
  echo "no python with a torch for $DEVICE found (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
  exit 1
fi
echo "== python: $PY"
DEVICE="$DEVICE" "$PY" - <<'PYEOF'
import importlib, os, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if os.environ["DEVICE"] == "cuda":
    print("device:", torch.cuda.get_device_name(0), "| capability",
          torch.cuda.get_device_capability(0),
          "| memory %.1f GiB" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
missing = [m for m in ("numpy", "sklearn", "pytest", "hypothesis")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing modules next to this torch: {missing} "
             "(pip install numpy scikit-learn pytest hypothesis)")
PYEOF
[ $? -eq 0 ] || exit 1

status=0
if [ "$DEVICE" = cuda ]; then
  echo "== CUDA tests"
  timeout 240 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_train.py tests/test_models.py || status=1
  echo "== bench_zoo on cuda"
  timeout 300 "$PY" benchmarks/bench_zoo.py --device cuda --packs 1,8,32,64,256 || status=1
else
  echo "== bench_zoo on cpu"
  timeout 300 "$PY" benchmarks/bench_zoo.py --device cpu --packs 1,8 || status=1
fi
echo "== the torch backend of the pairs and tests stages on $DEVICE: equality, then timings"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_backend.py || status=1
# numpy on this machine's CPUs against torch on its GPU: tiles, then the tests' units at the
# paper's N = 4,500 and a synthetic 10,000 (N = 100,000 takes ~25 min for numpy on 2 cores)
if [ "$DEVICE" = cuda ]; then
  timeout 300 "$PY" benchmarks/bench_tests_backend.py --blocks 512 1024 2048 4096 \
    --sizes 4500 10000 --perms 20 --repeat 2 || status=1
else
  timeout 300 "$PY" benchmarks/bench_tests_backend.py --blocks 512 --sizes 1000 --perms 5 \
    --repeat 1 || status=1
fi
exit $status
