"""Routing strategies (issue 12): ``base.py`` holds the contract, the registry and mixes.

Importing this package registers every built-in strategy (each module's classes use
``@register``); ``STRATEGIES`` then maps names to classes.

Layout::

    base.py      Strategy (the ``score`` hook), StrategyDeps, @register, parse_mix
    signals.py   saturation and load signals shared by all (unknown metrics stay unknown)
    basic.py     random, round-robin, least-request, power-of-two
    load.py      least-kv-cache, least-latency, throughput (scraped metrics, fallback)
    affinity.py  session-affinity (bounded-load consistent hashing), lora-affinity
    prefix.py    prefix-cache (approximate index, load gate), precise-prefix (priced tiers)
    fairness.py  vtc (virtual token counters as admission and placement)
    slo.py       slo (predicted TTFT/TPOT against targets)
    shoal.py     shoal, the default (lowest expected TTFT: sticky until saturated)
"""

# each import registers its module's strategies
from router.strategies import (  # noqa: F401
    affinity,
    basic,
    fairness,
    load,
    prefix,
    shoal,
    slo,
)
from router.strategies.base import STRATEGIES, MixMember, Strategy, StrategyDeps, parse_mix

__all__ = ["STRATEGIES", "MixMember", "Strategy", "StrategyDeps", "parse_mix"]
