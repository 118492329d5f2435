"""Shoal on Kubernetes: one values file in, validated manifests out (``shoal deploy``).

Layout::

    values.py        the values schema (frozen dataclasses, snake_case like shoal.toml),
                     strict parsing of a YAML values file and ``--set`` overrides
    sizes.py         the sizes derived from the values: arena -> tmpfs -> memory limits
    objects.py       builders for Kubernetes objects (labels, containers, probes, the
                     SHOAL_* environment from a component's settings dataclass)
    components/      one module per component; each ``render(values) -> list[dict]``
    render.py        all components in apply order, YAML out, a kustomize base on disk
    checks/          schema.py (Kubernetes OpenAPI via kubernetes-validate, CRDs via the
                     Prometheus Operator's published models), contracts.py (cross-object
                     contracts), rbac.py (the API calls the code makes -> the rules needed)
    cli.py           ``shoal deploy render|check|values``
    examples/        values files: the multi-node GPU example
    systemd/         units for bare machines

Why a renderer of our own and not Helm or plain kustomize: the values that matter are
coupled (the arena size is the tmpfs size is part of the daemon's memory limit; the engine's
UID, shm path and socket directory must equal the daemon's), so they are derived once, in
Python, from the same settings dataclasses the daemons parse; a text template cannot check
that a ``SHOAL_*`` variable names a real setting. The output is a kustomize base (one file
per component and a ``kustomization.yaml``), so last-mile patches stay kustomize overlays.
"""
