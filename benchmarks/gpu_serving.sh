#!/usr/bin/env bash
# The prepared device script (the `device` tool, one call of under 10 minutes): Triton 2.51 from the
# nvidia-pytriton wheel serving every model of triton_models/ with the KIND_GPU config and then
# with the CPU config on the same machine (benchmarks.gpu_models), and workload 4 (molecule_gnn
# through Triton against the same model in-process with torch on the same GPU).
# The machine has no registry: run `bash benchmarks/prepare_gpu_bundle.sh` here first; it fills
# .bench/ (the trimmed server, the wheels the GPU image lacks, the featurised molecules), which the
# device call carries. Records land in $OUT (the device tool) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/medbatch-site
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .bench/whl/*.whl
tar xJf .bench/tritonserver.tar.xz -C "$SITE"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import sys, sysconfig, torch, torch_geometric; print(sys.version.split()[0], sysconfig.get_config_var("LIBDIR"), torch.__version__, torch_geometric.__version__, torch.cuda.is_available())'
OUT_DIR=${OUT:-benchmarks/results}
python3 -m benchmarks.gpu_models --config-name gpu --out-dir "$OUT_DIR"
python3 -m benchmarks.gpu_models --out-dir "$OUT_DIR"
python3 -m benchmarks.triton_serving --config-name gpu --out-dir "$OUT_DIR" "$@"
if [ "${MEDBATCH_BENCH_CPU_TOO:-1}" = 1 ]; then
  python3 -m benchmarks.triton_serving --out-dir "$OUT_DIR" "$@"
fi
