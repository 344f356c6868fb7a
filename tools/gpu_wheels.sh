#!/usr/bin/env bash
# Download the pure-Python wheels a GPU machine without a package index needs to run
# tools/gpu_report.py, into .whl/ at the repository root (ignored through .git/info/exclude).
#
# The GPU image is assumed to hold torch, triton, transformers, numpy, PyYAML, packaging,
# typing-extensions, safetensors, tensorboard, tqdm, einops and setuptools. What it lacks:
#   - Hydra (hydra-core, omegaconf, antlr4-python3-runtime 4.9.3: PyPI has only an sdist
#     of that one, so it is built into a wheel here; it is pure Python);
#   - torchtitan 0.3.0 for the MoE-layer comparison, with the imports of its MoE module
#     (spmd_types, torch_checkpointing, tyro, docstring-parser, typeguard);
#   - megatron-core 0.16.0 (a cp312 manylinux wheel; needs only torch, numpy, packaging).
# Each is pinned to the version tested here. Install them there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# and moetrain itself from the checkout (no wheel; the checkout travels):
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
#
#     bash tools/gpu_wheels.sh            # downloads what is missing, prints the total size
#     PYTHON_VERSION=3.12 bash tools/gpu_wheels.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYV="${PYTHON_VERSION:-3.12}"
PY="${PYTHON:-python3}"

# Keep the wheels out of git, so that only the command that names them carries them.
EXCLUDE="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
case "$EXCLUDE" in /*) ;; *) EXCLUDE="$ROOT/$EXCLUDE" ;; esac
mkdir -p "$(dirname "$EXCLUDE")" "$DEST"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"

PURE=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  torchtitan==0.3.0
  spmd_types==0.2.3
  torch_checkpointing==0.1.1
  tyro==1.0.17
  docstring-parser==0.18.0
  typeguard==4.6.1
)
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform any)

have() {  # have NAME VERSION: a wheel of that project and version is in .whl/
  local n="${1//-/_}"
  compgen -G "$DEST/${n}-${2}-*.whl" >/dev/null || compgen -G "$DEST/${n,,}-${2}-*.whl" >/dev/null
}

download() {  # download NAME==VERSION
  local name="${1%%==*}" version="${1##*==}"
  have "$name" "$version" && return 0
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp "${PLATFORM[@]}" -d "$DEST" "$1"
}

for spec in "${PURE[@]}" megatron-core==0.16.0; do
  download "$spec"
done
# antlr4-python3-runtime 4.9.3 exists only as an sdist: build the (pure-Python) wheel here.
if ! have antlr4_python3_runtime 4.9.3; then
  "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" antlr4-python3-runtime==4.9.3
fi

# One version of each project only: two would stop `pip install --no-deps` there.
dups="$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [ -n "$dups" ]; then
  echo "more than one version of: $dups (remove the older wheel from $DEST)" >&2
  exit 1
fi
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
