#!/usr/bin/env bash
# Install the routers bench/router.py measures Shoal's router against into the bench's own
# virtual environment, .venv-bench (git-ignored; never the project's .venv):
#
#   bash bench/install_router_anchors.sh        (PYTHON=... picks the interpreter; 3.11 here)
#
# sglang-router 0.3.2 (`python -m sglang_router.launch_router`, policies cache_aware and
# round_robin) and vllm-router 0.1.17 (the `vllm-router` binary, policies cache_aware and
# consistent_hash) are Rust routers shipped as wheels; their Python dependencies are small
# (fastapi, uvicorn, aiohttp, orjson, setproctitle, ...), so pip resolves them normally.
# aiohttp is there too for bench/router.py's own client when run from this venv.
# Not part of CI. Idempotent: does nothing once both are installed at these versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-bench

CHECK='
import importlib.metadata as md
assert md.version("sglang-router") == "0.3.2", md.version("sglang-router")
assert md.version("vllm-router") == "0.1.17", md.version("vllm-router")
import sglang_router.launch_router
'
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null \
        && [ -x "$VENV/bin/vllm-router" ]; then
    echo "install_router_anchors: sglang-router 0.3.2 and vllm-router 0.1.17 already in $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet sglang-router==0.3.2 vllm-router==0.1.17 aiohttp
"$VENV/bin/python" -c "$CHECK"
"$VENV/bin/vllm-router" --help >/dev/null
echo "install_router_anchors: sglang-router 0.3.2 and vllm-router 0.1.17 installed into $VENV"
