"""Tensor-granular streaming loader (disk / S3 / HTTP / peer → CPU or GPU) and its sidecar.

Layout::

    plan.py        safetensors headers → validated per-tensor byte ranges (TP slicing)
    checkpoint.py  find a checkpoint's files, read all headers at once, plan the load
    sources/       where bytes come from: local, s3, http, peer (+ fallback), disk cache
    stream.py      many ranged reads in flight straight into tensors, yielded as they land
    staging.py     a ring of pinned host slots between the readers and a device
    vllm.py        ``--load-format shoal`` for vLLM (registered by ``shoal.vllm_plugin``)
    cli.py         ``shoal load SOURCE``
    sidecar/       ``shoal loader serve``: a gRPC sidecar staging checkpoints in /dev/shm
    errors.py      LoaderError and its subtree

Needs the ``loader`` extra (``pip install 'shoal[loader]'``: torch, grpcio, protobuf,
boto3, urllib3, tqdm). Importing this package or ``loader.plan`` needs none of them; the
``shoal`` command checks for them before it imports ``loader.cli`` or the sidecar's CLI.
"""
