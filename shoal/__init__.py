"""Shoal: data-plane daemons for serving LLMs on clusters.

Layout of this package (the shared core every component builds on)::

    shoal/
      cli.py      the one ``shoal`` console script; one subcommand group per component
      config.py   layered configuration: defaults < file < environment < flags
      logs.py     one structured (JSON-lines) log format for every daemon
      errors.py   ``ShoalError``, the root of every component's exception tree

Components live in sibling packages (``kvcache``, ``loader``, ``router``, ``control``)
and import from here, never from each other upward (checked by import-linter).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
