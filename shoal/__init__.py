"""Shoal: data-plane daemons for serving LLMs on clusters.

Layout of this package (the shared core every component builds on)::

    shoal/
      cli.py         the one ``shoal`` console script; components registered by name,
                     each imported only when chosen
      cli_format.py  exit codes and plain-text tables every component's CLI shares
      config.py      layered configuration: defaults < file < environment < flags
      logs.py        one structured (JSON-lines) log format and one ``shoal`` logger tree
      errors.py      ``ShoalError``, the root of every component's exception tree
      vllm_plugin.py vLLM's general-plugin hook (``--load-format shoal``), import-cheap

Components live in sibling packages (``kvcache``, ``loader``, ``router``, ``control``)
and import from here, never from each other upward (checked by import-linter). They stay
top-level packages (not ``shoal.kvcache``): users' ``kv_connector_module_path`` and scripts
name ``kvcache.connector...`` and ``loader...``.

The version has one source, the distribution's metadata (``pyproject.toml``).
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("shoal")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
