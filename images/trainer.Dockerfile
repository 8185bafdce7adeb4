# syntax=docker/dockerfile:1.7
# The training image: `kubetune train` under torchrun/DeepSpeed (what FineTuneJob/AlignmentJob
# pods run). Build from the repository root:
#   docker build -f images/trainer.Dockerfile -t ghcr.io/kubetune/kubetune-trainer:0.1.0 .
# Versions are pinned here and by images/constraints.txt (the pinned ML stack, which every pip
# install below uses); tests/test_images.py checks both against pyproject.toml and each other.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

# ---- build: compilers and CUDA headers for DeepSpeed ops and flash-attn -------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS build
ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_CUDA=cu128
ARG DEEPSPEED_VERSION=0.19.8
ARG BITSANDBYTES_VERSION=0.50.2
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG GALORE_VERSION=1.0
ARG MAX_JOBS=8
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev \
        build-essential ninja-build git \
    && rm -rf /var/lib/apt/lists/*
RUN python${PYTHON_VERSION} -m venv /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH
RUN pip install --upgrade pip setuptools wheel packaging ninja
COPY images/constraints.txt /src/images/constraints.txt
# CUDA build of torch first (and torchvision's for that torch: vision-language processors), so
# that nothing below pulls another one.
RUN pip install -c /src/images/constraints.txt "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url https://download.pytorch.org/whl/${TORCH_CUDA}
COPY pyproject.toml setup.py README.md /src/
COPY trainer /src/trainer
COPY operator /src/operator
RUN pip install -c /src/images/constraints.txt "/src[deepspeed,quant,galore,serve]" \
        "deepspeed==${DEEPSPEED_VERSION}" \
        "bitsandbytes==${BITSANDBYTES_VERSION}" \
        "galore-torch==${GALORE_VERSION}"
# flash-attn compiles against the torch above (prebuilt wheels are used when they match).
RUN MAX_JOBS=${MAX_JOBS} pip install -c /src/images/constraints.txt --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"
RUN python -c "import torch, torchvision, deepspeed, bitsandbytes, flash_attn, kubetune.trainer.cli.main" \
    && kubetune --help >/dev/null

# ---- runtime: CUDA runtime libraries, the venv, a non-root user -------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION}
ARG PYTHON_VERSION=3.12
ENV DEBIAN_FRONTEND=noninteractive
# DeepSpeed JIT-builds some ops at first use: keep a compiler and the Python headers.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-dev build-essential ninja-build ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel -r ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 kubetune && useradd --uid 1000 --gid 1000 --create-home kubetune
COPY --from=build /opt/kubetune /opt/kubetune
# The operator runs these pods as uid 1000 with a read-only root filesystem: every writable
# path (HOME, caches, /tmp, /dev/shm) is a mounted volume or under $HOME.
ENV PATH=/opt/kubetune/bin:$PATH \
    HOME=/home/kubetune \
    HF_HOME=/home/kubetune/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/kubetune
ENTRYPOINT ["kubetune"]
CMD ["--help"]
