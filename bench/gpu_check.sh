#!/usr/bin/env bash
# Direct continuous batching and the worker's engine adapter on random Llamas (SmolLM2-135M's config and a
# ~1B one): tokens/s and ms per step at batch 1, 16, 64, 256, on CUDA in bf16 (bench/inferlog_bench/gpu_check.py).
#   bench/gpu_check.sh            on a GPU machine, with that machine's own Python and torch
#   bench/gpu_check.sh --tiny     a tiny config on the CPU (make test runs it)
# A GPU machine's own transformers may differ from the pinned one (the worker needs 5.24's batching API):
# `bench/gpu_check.sh --prepare` (here) puts the pinned wheel and SmolLM2's config and tokenizer files into
# bench/.gpu-carry/ (a few MiB, git-ignored); carry that folder, and this script uses them there.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
CARRY="$HERE/.gpu-carry"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$CARRY/assets"
  "$PY" -m pip download -q --no-deps -d "$CARRY" "transformers==$("$PY" -c 'import transformers; print(transformers.__version__)')"
  "$PY" - "$CARRY/assets" <<'PY'
import shutil, sys
from inferlog.config import DEFAULT_MODEL_NAME, InferlogSettings
from inferlog.models import ModelRegistry, prepare
from inferlog.testing import TOKENIZER_FILES
src = prepare(ModelRegistry(InferlogSettings()).get(DEFAULT_MODEL_NAME)).directory
for name in ("config.json", *TOKENIZER_FILES):
    if (src / name).is_file():
        shutil.copy(src / name, sys.argv[1])
PY
  du -sh "$CARRY"
  exit 0
fi
EXTRA=()
if ls "$CARRY"/transformers-*.whl > /dev/null 2>&1; then  # the pinned transformers, pure Python: unpack it
  mkdir -p "$CARRY/site"
  [ -d "$CARRY/site/transformers" ] || "$PY" -m zipfile -e "$CARRY"/transformers-*.whl "$CARRY/site"
  export PYTHONPATH="$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
  EXTRA=(--assets "$CARRY/assets")
fi
export PYTHONPATH="$HERE:$ROOT:$ROOT/shared:$ROOT/services/gpu-worker${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m inferlog_bench.gpu_check "${EXTRA[@]}" "$@"
