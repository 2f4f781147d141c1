# The fedlora project image: the Flower runtime (flower-superlink, flower-supernode,
# flower-superexec, flwr) with torch, transformers, peft and this package installed,
# so ServerApp and ClientApp processes import everything from the image and nothing
# is installed at run time (SuperExec's runtime dependency installation stays off).
# One image serves every service of docker-compose.yml.
#
#   docker build -t fedlora .                          # CPU torch (default)
#   docker build -t fedlora:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#
# A CUDA build needs the NVIDIA container toolkit on the host and a GPU reserved
# for the ClientApp executors (README.md, "GPU nodes, other models").
FROM python:3.12-slim

ARG TORCH_VERSION=2.13.0
# Empty: torch from the package index, as README's CPU install; a PyTorch wheel
# index URL (e.g. https://download.pytorch.org/whl/cu126) gives a CUDA build.
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/app \
    FLWR_HOME=/home/app/.flwr \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

WORKDIR /fedlora
# The dependencies in their own layer, installed through empty stand-in packages,
# so that a code change rebuilds only the last layer.
COPY pyproject.toml README.md ./
RUN mkdir fedlora server client \
    && touch fedlora/__init__.py server/__init__.py client/__init__.py \
    && pip install . && pip uninstall -y fedlora && rm -rf fedlora server client build *.egg-info
COPY fedlora fedlora
COPY server server
COPY client client
RUN pip install --no-deps . && rm -rf build *.egg-info

# Services run as the host user that owns the bind-mounted keys and ./runs
# (docker-compose.yml `user:`), whatever its uid: HOME (Flower's apps, HF caches),
# the results folder and the SuperLink's state volume are writable by anyone.
RUN mkdir -p /home/app /fedlora/runs /state \
    && chmod 1777 /home/app /fedlora/runs /state
