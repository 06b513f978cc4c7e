# Sift image. CPU by default:
#   docker build -t sift .
# CUDA image with faiss-gpu and a CUDA torch build (needs the NVIDIA container toolkit at run time):
#   docker build -t sift:cuda --build-arg VARIANT=cuda .
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cpu" FAISS_SPEC="faiss-cpu"

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cu124" FAISS_SPEC="faiss-gpu-cu12"

FROM base-${VARIANT} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    SIFT_BUNDLE=/data/index SIFT_SERVER__HOST=0.0.0.0
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX}"
WORKDIR /srv/sift
COPY pyproject.toml README.md ./
COPY app ./app
COPY indexer ./indexer
COPY configs ./configs
COPY examples ./examples
COPY models ./models
RUN pip install --no-cache-dir ".[generate]" \
    && if [ "${FAISS_SPEC}" != "faiss-cpu" ]; then pip uninstall -y faiss-cpu && pip install --no-cache-dir "${FAISS_SPEC}"; fi
RUN useradd --create-home sift && mkdir -p /data && chown sift /data
USER sift
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["sift", "serve", "--config", "configs/default.yaml", "--bundle", "/data/index"]
