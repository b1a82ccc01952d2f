# GPU image for training and sampling. Build, then run with your checkpoints, photos and results
# mounted from the host (README "Install for a GPU workstation" shows the same command):
#   docker build -t <username>/momentum-ti .
#   docker run -d -it -P --gpus all --shm-size=8g \
#       -v "$PWD/models:/workspace/models" -v "$PWD/inputs:/workspace/inputs" \
#       -v "$PWD/logs:/workspace/logs" -v "$PWD/outputs:/workspace/outputs" \
#       --name momentum-ti <username>/momentum-ti
#   docker exec -it momentum-ti python main.py --help
# models/ (checkpoints) and inputs/ (photos) are never copied into the image (.dockerignore); logs/
# (embeddings, last.ckpt) and outputs/ (samples) are written to the host, so they outlive the
# container. --shm-size: DataLoader workers and NCCL (--gpus 0,1) share memory through /dev/shm,
# which Docker limits to 64 MB by default (--ipc=host also works).
# The CUDA 13.0 base matches the CUDA runtime bundled in the pinned torch wheel: the host needs an
# NVIDIA driver >= 580 (nvidia-smi shows it) and the NVIDIA Container Toolkit. Without them main.py
# --gpus stops with an error saying so; --accelerator cpu trains on the CPU. The wheel brings its
# own cuBLAS/cuDNN, the base image contributes the driver hooks.
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
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace

# Dependencies first, so editing the code does not reinstall them.
COPY requirements.txt ./
RUN pip install --no-input -r requirements.txt

COPY pyproject.toml main.py README.md ./
COPY configs ./configs
COPY ldm ./ldm
COPY scripts ./scripts
# The project itself (ldm, main.py), editable over /workspace as `make venv` installs it: the scripts
# import `ldm` as an installed package. Its dependencies are the pins installed above.
RUN pip install --no-input --no-deps --no-build-isolation -e .
# Mount points of the docker run above (empty in the image).
RUN mkdir -p models inputs logs outputs

# TensorBoard for logs/ (`tensorboard --logdir logs --bind_all`); `-P` publishes it.
EXPOSE 6006

# An interactive shell, so the detached `docker run -d -it` above keeps the container up.
CMD ["/bin/bash"]
