#!/usr/bin/env bash
# Fill .bench/ for benchmarks/gpu_serving.sh: a trimmed copy of the Triton server from the
# installed nvidia-pytriton wheel (Python 3.12 stub only), the wheels the GPU image lacks
# (for its Python 3.12), and RDKit's NCI molecules featurised by the workers' featuriser.
set -euo pipefail
cd "$(dirname "$0")/.."
SP=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
STAGE=$(mktemp -d)
mkdir -p .bench/whl "$STAGE/pytriton/tritonserver/python_backend_stubs" "$STAGE/nvidia_pytriton.libs"
touch "$STAGE/pytriton/__init__.py"
cp -r "$SP/pytriton/tritonserver/bin" "$SP/pytriton/tritonserver/backends" "$STAGE/pytriton/tritonserver/"
cp -r "$SP/pytriton/tritonserver/python_backend_stubs/3.12" "$STAGE/pytriton/tritonserver/python_backend_stubs/"
cp "$SP"/nvidia_pytriton.libs/* "$STAGE/nvidia_pytriton.libs/"
rm -f "$STAGE"/nvidia_pytriton.libs/libpython3-*
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
(cd "$STAGE" && tar cf - . | xz -T0 -6) > .bench/tritonserver.tar.xz
rm -rf "$STAGE"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .bench/whl \
  tritonclient==2.73.0 python-rapidjson pydantic pydantic-core pydantic-settings \
  typing-inspection annotated-types python-dotenv
.venv/bin/python -c 'from benchmarks.triton_serving import DEFAULT_INPUTS, build_inputs; build_inputs(DEFAULT_INPUTS)'
du -sh .bench
