"""Routing strategies (issue 12): ``base.py`` holds the contract, the registry and mixes.

Importing this package registers every built-in strategy (each module's classes use
``@register``); ``STRATEGIES`` then maps names to classes.

Layout::

    base.py      Strategy (the ``score`` hook), StrategyDeps, @register, parse_mix
    signals.py   saturation and load signals shared by all (unknown metrics stay unknown)
    basic.py     random, round-robin, least-request, power-of-two
"""

from router.strategies import basic  # noqa: F401  (registers its strategies)
from router.strategies.base import STRATEGIES, MixMember, Strategy, StrategyDeps, parse_mix

__all__ = ["STRATEGIES", "MixMember", "Strategy", "StrategyDeps", "parse_mix"]
