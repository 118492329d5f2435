"""OpenAI-compatible gateway choosing an engine per request (prefix-cache aware).

Not built yet: see the router issue. The package exists so the layout and the layering
contracts hold from the first commit.
"""
