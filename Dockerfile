# GPU image for training and sampling.
#   docker build -t <username>/<imagename> .
#   docker run -d -it -P --gpus all -v "$PWD/models:/workspace/models" \
#       -v "$PWD/logs:/workspace/logs" --name <container_name> <username>/<imagename>
#   docker exec -it <container_name> python main.py --help
# Checkpoints are kept out of the build context (.dockerignore): mount models/ as above.
# The CUDA 13.0 base matches the CUDA runtime bundled in the pinned torch wheel (host driver
# >= 580); the wheel brings its own cuBLAS/cuDNN, the base image contributes the driver hooks.
FROM nvidia/cuda:13.0.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Native needs of the pinned wheels (checked with ldd): dlib-bin, torch and pillow link only
# glibc, libstdc++, libgcc and zlib, all in the base image. No OpenCV, so no libGL/libglib.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/workspace

WORKDIR /workspace

# Dependencies first, so editing the code does not reinstall them.
COPY requirements.txt ./
RUN pip install --no-input -r requirements.txt

COPY main.py README.md ./
COPY configs ./configs
COPY ldm ./ldm
COPY scripts ./scripts
COPY inputs ./inputs
COPY models ./models

# TensorBoard for logs/ (`tensorboard --logdir logs --bind_all`); `-P` publishes it.
EXPOSE 6006

# An interactive shell, so the detached `docker run -d -it` above keeps the container up.
CMD ["/bin/bash"]
