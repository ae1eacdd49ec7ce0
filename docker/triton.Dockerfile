# NVIDIA Triton (2.51 = NGC 24.10, the release of the nvidia-pytriton wheel used locally) whose
# python backend carries torch and torch-geometric for the models in triton_models/.
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN pip install --no-cache-dir torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124 \
    && pip install --no-cache-dir "torch-geometric>=2.5" "numpy<2"
# Every model.py imports the shared adapter (triton_torch_adapter/). It goes next to
# triton_python_backend_utils.py: the python backend folder is on the stub's sys.path, as in the
# local stack (medbatch/stack/triton_server.py).
COPY triton_torch_adapter /opt/tritonserver/backends/python/triton_torch_adapter
COPY triton_models /models
