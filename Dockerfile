# The hpsearch image: docker-compose.yml runs its mlflow, dashboard and worker services from it.
#
#   docker compose build                                   # CPU-only torch (the default)
#   docker compose --profile gpu build worker-gpu          # CUDA torch, tagged hpsearch:gpu
#   docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t hpsearch:gpu .   # the same by hand
FROM python:3.11-slim

# Where torch and torchvision come from. PyTorch's CPU index keeps several GB of CUDA libraries
# out of the image; PyPI's Linux wheels bundle CUDA, so TORCH_INDEX_URL=https://pypi.org/simple
# (or a https://download.pytorch.org/whl/cuXXX index) gives a GPU image.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

# torch first, in a layer of its own: it is most of the image and changes far less often than hpsearch.
RUN pip install --index-url "$TORCH_INDEX_URL" torch torchvision

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hpsearch ./hpsearch
# torch is already there, so this adds only hpsearch and its other dependencies (from PyPI).
RUN pip install . && rm -rf /src
COPY studies /studies

# A non-root user. The named volumes of docker-compose.yml are mounted on these directories;
# a fresh named volume takes the owner of the directory it covers, so this user can write to it.
RUN useradd --create-home --uid 1000 --user-group hpsearch \
 && mkdir -p /artifacts /mlartifacts /data \
 && chown hpsearch:hpsearch /artifacts /mlartifacts /data
USER hpsearch
WORKDIR /home/hpsearch

CMD ["hpsearch", "--help"]
