#!/usr/bin/env bash
# Install the published libraries the benchmarks measure Shoal against: the two KV caches
# of bench/anchors.py, aibrix-kvcache 0.8.0 (its L1 cache) and LMCache 0.5.6 (its local CPU
# backend), and the two weight loaders of bench/loader.py, the Run:ai model streamer 0.17
# (with its S3 backend) and fastsafetensors 0.5.0.
#
#   PYTHON=.venv/bin/python bash bench/install_anchors.sh      (PYTHON defaults to that)
#
# Not part of CI. Idempotent: does nothing once all of them import. torch must already be
# there (the CPU build on a CPU machine): every install here is --no-deps, so pip never
# resolves torch (or the CUDA wheels these packages declare) from the registry. Their
# declared dependency lists are far larger than what their import paths need (LMCache
# names cupy, cuda-python, nixl, google-cloud, opentelemetry, ...); below are only the
# pure-Python (or CPU-wheel) packages that `import aibrix_kvcache`,
# `import lmcache.v1.cache_engine`, `import runai_model_streamer` and `import fastsafetensors`
# actually ask for (the Run:ai wheel carries its native readers, libstreamer and
# libstreamers3; runai-model-streamer-s3 0.17.1 is what its 0.17.0 ran S3 with here).
# Packages Shoal itself depends on (numpy, pyzmq, msgpack, uvloop, pyyaml, prometheus-client,
# boto3, ...) are named without a version so that an installed copy is left alone; the rest
# are pinned to versions that were checked together on Python 3.11 with torch 2.13.0+cpu and
# numpy 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

CHECK='
import asyncio, os
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
policy = asyncio.get_event_loop_policy()
from aibrix_kvcache import BaseKVCacheManager, KVCacheConfig, TokenListView
from aibrix_kvcache.spec import KVCacheBlockSpec, ModelSpec
asyncio.set_event_loop_policy(policy)
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
import importlib.metadata as md
assert md.version("aibrix-kvcache") == "0.8.0", md.version("aibrix-kvcache")
assert md.version("lmcache") == "0.5.6", md.version("lmcache")
from runai_model_streamer import SafetensorsStreamer
import runai_model_streamer_s3
from fastsafetensors import SafeTensorsFileLoader
assert md.version("runai-model-streamer") == "0.17.0", md.version("runai-model-streamer")
assert md.version("runai-model-streamer-s3") == "0.17.1", md.version("runai-model-streamer-s3")
assert md.version("fastsafetensors") == "0.5.0", md.version("fastsafetensors")
'

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "install_anchors: $PYTHON has no torch; install the CPU build of torch first" >&2
    exit 1
fi
if "$PYTHON" -c "$CHECK" >/dev/null 2>&1; then
    echo "install_anchors: aibrix-kvcache, lmcache, runai-model-streamer and fastsafetensors already import"
    exit 0
fi

PACKAGES=(
    aibrix-kvcache==0.8.0
    lmcache==0.5.6
    # what aibrix_kvcache imports
    "cityhash>=0.4.8" "msgspec>=0.19" "more-itertools>=10.7" netifaces
    "redis==6.0.0" zstandard tqdm sortedcontainers uvloop pyyaml numpy
    # what lmcache.v1.cache_engine imports
    numba==0.68.1 llvmlite==0.50.0
    transformers==5.23.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0
    "regex>=2025.10.22" typer filelock fsspec packaging typing_extensions
    httpx2==2.16.2 httpcore2==2.16.2 "anyio>=4.10" h11 truststore
    aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna
    aiofile caio cachetools cryptography cffi py-cpuinfo psutil
    requests certifi charset_normalizer urllib3 pyzmq prometheus_client
    # the weight loaders of bench/loader.py and what they import
    runai-model-streamer==0.17.0 runai-model-streamer-s3==0.17.1 "humanize>=4.9" boto3
    botocore s3transfer jmespath python-dateutil six
    fastsafetensors==0.5.0
)
"$PYTHON" -m pip install --no-deps "${PACKAGES[@]}"

# Newer releases of these packages may import something more; name it here if so.
declare -A PKG_OF=([cpuinfo]=py-cpuinfo [yaml]=pyyaml [attr]=attrs [zmq]=pyzmq
    [_cffi_backend]=cffi [farmhash]=cityhash [dateutil]=python-dateutil)
for _ in 1 2 3 4 5 6 7 8; do
    out=$("$PYTHON" -c "$CHECK" 2>&1) && break
    mod=$(grep -o "No module named '[^']*'" <<<"$out" | head -1 | cut -d"'" -f2 | cut -d. -f1)
    if [ -z "$mod" ]; then
        echo "$out" | tail -5 >&2
        echo "install_anchors: the anchors do not import (see above)" >&2
        exit 1
    fi
    echo "install_anchors: also installing ${PKG_OF[$mod]:-$mod} (imported as $mod)"
    "$PYTHON" -m pip install --no-deps "${PKG_OF[$mod]:-$mod}"
done
"$PYTHON" -c "$CHECK" >/dev/null 2>&1 || { echo "install_anchors: still failing" >&2; exit 1; }
echo "install_anchors: aibrix-kvcache 0.8.0, lmcache 0.5.6, runai-model-streamer 0.17.0 (+s3 0.17.1) and fastsafetensors 0.5.0 installed into $PYTHON"
