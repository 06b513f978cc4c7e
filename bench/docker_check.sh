#!/usr/bin/env bash
# Build the CPU image and run the compose stack for real: the indexer job, then the API; wait for /readyz,
# search with a key, tear everything down. Exit 0 only if every step passed. From the repository root:
#   bash bench/docker_check.sh            # SIFT_BASE=sift-base:bookworm where no registry is reachable
# Environment:
#   SIFT_BASE     base image for the CPU variant (default python:3.11-slim)
#   SIFT_PORT     host port for the API (default 8000)
#   PIP_CERT      CA bundle pip needs behind a TLS-inspecting proxy (default: what `pip config list` names);
#                 served on loopback during the build only (PIP_CERT_URL), never baked into the image
#   SIFT_WHEELS   folder holding a local torch wheel (default: pip's find-links); copied into ./wheels/
#   SIFT_CUDA=1   also try the CUDA variant and report how far it gets
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${SIFT_BASE:-python:3.11-slim}
PORT=${SIFT_PORT:-8000}
PROJECT=siftcheck
COMPOSE=$(docker compose version >/dev/null 2>&1 && echo "docker compose" || echo "docker-compose")
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "docker daemon"
docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}' || {
  echo "no Docker daemon: start one (see ../shared/ENVIRONMENT.md: apt-get install docker.io; dockerd &)"; exit 1; }

CERT=${PIP_CERT:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'/\1/p" | head -1)}
WHEELS=${SIFT_WHEELS:-$(python3 -m pip config list 2>/dev/null | sed -n "s/^global.find-links='\(.*\)'/\1/p" | head -1)}
TORCH_INDEX=default
if [ -n "$WHEELS" ] && ls "$WHEELS"/torch-2.13.0*cpu*.whl >/dev/null 2>&1; then
  cp -u "$WHEELS"/torch-2.13.0*cpu*.whl wheels/
  TORCH_INDEX=none  # the local CPU wheel; PyPI's torch 2.13.0 is a multi-GB CUDA build
fi
CERT_ARGS=()
if [ -n "$CERT" ] && [ -f "$CERT" ]; then  # a loopback-only HTTP server holding just the CA bundle, for the build
  CERT_DIR=$(mktemp -d); cp "$CERT" "$CERT_DIR/ca.pem"
  CERT_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server "$CERT_PORT" --bind 127.0.0.1 --directory "$CERT_DIR" >/dev/null 2>&1 &
  CERT_PID=$!
  CERT_ARGS=(--network host --build-arg "PIP_CERT_URL=http://127.0.0.1:$CERT_PORT/ca.pem")
fi
stop_cert() { [ -n "${CERT_PID:-}" ] && kill "$CERT_PID" 2>/dev/null; rm -rf "${CERT_DIR:-/nonexistent}"; CERT_PID=; }

step "build sift:latest (base $BASE, torch from ${TORCH_INDEX/none/./wheels})"
start=$(date +%s)
docker build --build-arg BASE="$BASE" --build-arg TORCH_INDEX="$TORCH_INDEX" "${CERT_ARGS[@]}" \
  -t sift:latest . 2>&1 | grep -E '^Step |Successfully|ERROR|error' || true
docker image inspect sift:latest --format 'image {{.Id}} {{.Size}} bytes' || { echo "build failed"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

cleanup() { stop_cert; step "tear down"; SIFT_API_KEY=x $COMPOSE -p $PROJECT down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
step "compose up: indexer job, then the API on :$PORT"
SIFT_API_KEY=$KEY SIFT_PORT=$PORT $COMPOSE -p $PROJECT up -d --no-build
deadline=$(( $(date +%s) + 600 ))
until curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  if [ "$(date +%s)" -gt $deadline ]; then
    echo "API not ready in 600 s"; SIFT_API_KEY=$KEY $COMPOSE -p $PROJECT logs --tail 50; exit 1; fi
  sleep 3
done
SIFT_API_KEY=$KEY $COMPOSE -p $PROJECT ps
echo "indexer job: $(SIFT_API_KEY=$KEY $COMPOSE -p $PROJECT logs indexer 2>&1 | grep -E 'built [0-9]+ documents' | tail -1)"
curl -fsS "http://127.0.0.1:$PORT/readyz" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("readyz:", r["status"], r["bundle"], r["modes"])'

step "search"
unauth=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$PORT/v1/search" \
  -H 'content-type: application/json' -d '{"query": "how do stars form"}')
echo "without a key: HTTP $unauth"; [ "$unauth" = 401 ]
curl -fsS -X POST "http://127.0.0.1:$PORT/v1/search" -H "Authorization: Bearer $KEY" \
  -H 'content-type: application/json' -d '{"query": "how do stars form", "k": 3}' | python3 -c '
import json, sys
r = json.load(sys.stdin)
hits = r["hits"]
print("search:", len(hits), "hits; top:", hits[0]["doc_id"], round(hits[0]["score"], 4), "stages", sorted(hits[0]["explain"]))
print("timings ms:", {k: round(v, 1) for k, v in r["timings_ms"].items()})
assert hits and hits[0]["doc_id"] == "astro-001", hits[0]["doc_id"]'

if [ "${SIFT_CUDA:-0}" = 1 ]; then
  step "CUDA variant (as far as this machine allows)"
  docker build --build-arg VARIANT=cuda --build-arg BASE="${SIFT_CUDA_BASE:-nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04}" \
    "${CERT_ARGS[@]}" -t sift:cuda . 2>&1 | tail -3 || true
  echo "(the CUDA variant needs its base image from a registry; where none is reachable the build stops at FROM)"
fi
step "PASS"
