#!/usr/bin/env bash
# Compile check of the MetaEmbed CUDA kernels (lib/metaembed/kernels/maxsim.cu) for sm_80 and sm_90.
# CI has nvcc but no GPU: this only compiles (into a temp dir, always from scratch).
# Exit 0 with a skip message when nvcc is absent; non-zero when compilation fails.
# Needs only python3 (no torch): metaembed.kernels.build uses the standard library.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${METAEMBED_NVCC:-}"
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do  # the order metaembed.kernels.build.find_nvcc uses
  if [[ -z "$NVCC" && -n "$root" && -x "$root/bin/nvcc" ]]; then
    NVCC="$root/bin/nvcc"
  fi
done
if [[ -z "$NVCC" ]]; then
  NVCC="$(command -v nvcc || true)"
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_kernels: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "compile_kernels: $("$NVCC" --version | tail -n 1)"
start=$(date +%s)
METAEMBED_NVCC="$NVCC" PYTHONPATH="lib${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m metaembed.kernels --arch sm_80 --arch sm_90 --out "$OUT" --force
echo "compile_kernels: sm_80 + sm_90 OK in $(( $(date +%s) - start )) s"
