#!/usr/bin/env bash
# One short run on an NVIDIA GPU: the `cuda` tests, then GPT-2 124M training throughput and
# llama-110m decoding speed, ling beside transformers in the same run, as one Markdown report.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh          # on the GPU machine, in the repo root
#   OUT=/tmp/gpu-smoke benchmarks/gpu_check.sh --smoke   # anywhere: tiny models on the CPU
#
# Python: $VENV (default .venv-cuda) if it holds a CUDA torch; else a fresh $VENV with the
# README's CUDA build ($TORCH_SPEC, torch 2.13.0) and ling, where the network allows; else
# the first of $PYTHON / python3 whose torch sees a GPU (a GPU image's own, said in the
# report). If that Python lacks a package ling needs, the wheels in .whl/ are installed
# (after the image's packages on the path): benchmarks/gpu_wheels.sh makes them on a
# machine with a network, for one without.
#
# Time boxes (seconds; each part is stopped at its box, what it printed so far is kept):
# PYTEST_BOX=180 for `pytest -m cuda`, then TRAIN_BOX=120 + DECODE_BOX=180 = 5 minutes of
# benchmarks (the issue's box is 6), 8 minutes in all. PARTS="train decode" (say) runs only
# those parts (a rerun after a fix). Writes $OUT/gpu_check.md (the report) and a log per part beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
VENV=${VENV:-.venv-cuda}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"}
PARTS=${PARTS:-pytest train decode}
SMOKE=0 BOX=""
[ "${1:-}" = "--smoke" ] && SMOKE=1 BOX=600  # a busy CPU: the boxes are for the GPU's time
PYTEST_BOX=${PYTEST_BOX:-${BOX:-180}} TRAIN_BOX=${TRAIN_BOX:-${BOX:-120}} DECODE_BOX=${DECODE_BOX:-${BOX:-180}}
mkdir -p "$OUT"
REPORT=$OUT/gpu_check.md
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
online() { python3 -c "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null; }

# ---- which Python ----------------------------------------------------------------------
PY="" NOTE=""
if [ $SMOKE = 1 ]; then
  PY=${PYTHON:-python3} NOTE="smoke run on the CPU: tiny models, not a measurement"
elif [ -x "$VENV/bin/python" ] && has_cuda "$VENV/bin/python"; then
  PY=$VENV/bin/python
elif online; then
  echo "creating $VENV with $TORCH_SPEC ..." >&2
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet $TORCH_SPEC \
    && "$VENV/bin/pip" install --quiet -e ".[hf,serve]" pytest pytest-timeout httpx \
    && has_cuda "$VENV/bin/python" && PY=$VENV/bin/python
fi
if [ -z "$PY" ]; then
  for candidate in ${PYTHON:-} python3; do
    if has_cuda "$candidate"; then PY=$candidate; break; fi
  done
  [ -n "$PY" ] && NOTE="no network for $VENV: the image's own torch"
fi
if [ -z "$PY" ]; then
  echo "error: no Python here has a torch that sees a CUDA GPU, and $VENV could not be made (no network?)" >&2
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
imports() { "$PY" -c "import ling.cli, tyro, fastapi, uvicorn, transformers, httpx, pytest" 2>"$OUT/imports.log"; }
if ! imports && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # a machine without network: the carried wheels
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ling-site .whl/*.whl \
    || { echo "error: installing the wheels in .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=$PYTHONPATH:/tmp/ling-site
fi
if ! imports; then
  echo "error: $PY lacks a package ling needs ($(tail -1 "$OUT/imports.log")); make wheels with benchmarks/gpu_wheels.sh" >&2
  exit 1
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__)")
case $torch_version in 2.13.0*) ;; *) NOTE="${NOTE:+$NOTE; }torch $torch_version, not 2.13.0" ;; esac

# ---- the report ------------------------------------------------------------------------
{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  if [ $SMOKE = 1 ]; then "$PY" benchmarks/machine.py --threads 2; else "$PY" benchmarks/machine.py --device cuda; fi
  echo "- python: $PY, torch $torch_version${NOTE:+ ($NOTE)}"
  echo
} > "$REPORT"

part() {  # part NAME BOX COMMAND...: run with a time box, log to $OUT/NAME.log, say how it ended
  local name=$1 box=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (at most ${box} s) ==" >&2
  timeout --signal=INT --kill-after=15 "$box" "$@" > "$OUT/$name.md" 2> "$OUT/$name.log"
  rc=$?
  local took=$((SECONDS - t0))
  case $rc in
    0) echo "<!-- $name: ${took} s -->" ;;
    124|130|137) echo "**$name: stopped at its ${box} s box** (what it printed before is below)" ;;
    *) echo "**$name: exit code $rc after ${took} s** (the last lines of $name.log:)"; echo '```'; tail -5 "$OUT/$name.log"; echo '```' ;;
  esac >> "$REPORT"
  echo "== $name: rc $rc, ${took} s ==" >&2
}

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

# 1. the cuda tests (on the CPU, in the smoke run, they are all skipped: the skip is what is checked)
if wanted pytest; then
  echo "## pytest -m cuda" >> "$REPORT"
  part pytest "$PYTEST_BOX" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider
  echo '```' >> "$REPORT"; tail -15 "$OUT/pytest.md" >> "$REPORT"; echo '```' >> "$REPORT"
fi

# 2. training throughput: GPT-2 124M, T=1024, bf16, with and without --train.compile, vs GPT2LMHeadModel
if wanted train; then
  echo -e "\n## Training throughput: GPT-2 124M, bf16\n" >> "$REPORT"
  if [ $SMOKE = 1 ]; then
    part train "$TRAIN_BOX" "$PY" benchmarks/train_throughput.py --device cpu --smoke --precisions bf16
  else
    part train "$TRAIN_BOX" "$PY" benchmarks/train_throughput.py --device cuda --model gpt2-124m --precisions bf16 \
      --compile --rounds 10 --steps 10 --budget $((TRAIN_BOX - 20))
  fi
  grep -v '^- ' "$OUT/train.md" >> "$REPORT"
fi

# 3. decoding: llama-110m at batch 1 and 32, eager and compiled, vs transformers generate
if wanted decode; then
  echo -e "\n## Decoding: llama-110m, bf16\n" >> "$REPORT"
  if [ $SMOKE = 1 ]; then
    part decode "$DECODE_BOX" "$PY" benchmarks/bench_generate.py --device cpu --smoke --dtypes fp32 --dir "$OUT/hf-models"
  else
    part decode "$DECODE_BOX" "$PY" benchmarks/bench_generate.py --device cuda --models llama-110m --dtypes bf16 \
      --batches 1 32 --compile --rounds 3 --dir /tmp/ling-bench-generate
  fi
  grep -v '^- GPU\|^- host\|^- torch' "$OUT/decode.md" >> "$REPORT"
  rm -rf "$OUT/hf-models"
fi

echo -e "\n<!-- gpu_check.sh: $((SECONDS - started)) s in all -->" >> "$REPORT"
echo "wrote $REPORT ($((SECONDS - started)) s)" >&2
cat "$REPORT"
