# Mask R-CNN environment. The default base runs on CPU; for Ascend pass an Ascend MindSpore image:
#   docker build -t maskrcnn:ascend . --build-arg FROM_IMAGE_NAME=<ascend-mindspore image>
# then start it with scripts/docker_start.sh IMAGE DATA_DIR MODEL_DIR.
ARG FROM_IMAGE_NAME=python:3.11-slim
FROM ${FROM_IMAGE_NAME}

# g++ and oneDNN's headers (requirements-kernels.txt) build our CPU kernels (src/ops/kernels/) when the mounted
# repository runs `python -m src.ops.build`; without them, CPU runs fall back to MindSpore's slower operators.
RUN if command -v apt-get >/dev/null && ! command -v g++ >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*; fi
COPY requirements.txt requirements-kernels.txt /tmp/maskrcnn/
RUN python3 -m pip install --no-cache-dir -r /tmp/maskrcnn/requirements.txt \
    && python3 -m pip install --no-cache-dir --no-deps -r /tmp/maskrcnn/requirements-kernels.txt && rm -rf /tmp/maskrcnn
WORKDIR /workspace
