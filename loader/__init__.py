"""Tensor-granular streaming loader (S3 / HTTP / disk / peer → GPU) and its gRPC sidecar.

Not built yet: see the loader issue. The package exists so the layout and the layering
contracts (``kvcache`` and ``loader`` never import ``router`` or ``control``) hold from
the first commit.
"""
