#!/usr/bin/env bash
# Wheels of the packages ling needs that a bare GPU image may lack, for a GPU machine with no
# network (benchmarks/gpu_check.sh installs whatever it finds in .whl/ before it starts).
# Run it on a machine with network, in the repo root, with the venv that runs ling:
#   benchmarks/gpu_wheels.sh [PYTHON_VERSION (default 3.12)]
# Versions are those installed here; the GPU machine's Python version and platform are named.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PACKAGES="tyro docstring-parser typeguard fastapi starlette pydantic pydantic-core annotated-types
typing-inspection annotated-doc opentelemetry-api uvicorn"
mkdir -p .whl
specs=()
for name in $PACKAGES; do
  version=$(python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "error: $name is not installed here (pip install -e '.[dev]' first)" >&2; exit 1; }
  specs+=("$name==$version")
done
python -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
echo "wrote $(ls .whl | wc -l) wheels to .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
