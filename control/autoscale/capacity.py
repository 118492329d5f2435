"""How many requests per second of a token mix one replica serves within an SLO.

Not built yet (issue 13, the shoal policy helper).
"""
