"""Routing strategies (issue 12): ``base.py`` holds the contract, the registry and mixes.

Importing this package registers every built-in strategy (each module's classes use
``@register``); ``STRATEGIES`` then maps names to classes.
"""

from router.strategies import basic  # noqa: F401  (registers its strategies)
from router.strategies.base import STRATEGIES, MixMember, Strategy, StrategyDeps, parse_mix

__all__ = ["STRATEGIES", "MixMember", "Strategy", "StrategyDeps", "parse_mix"]
