"""Autoscaling on engine metrics, ILP placement over heterogeneous GPUs, Ray orchestration.

Not built yet: see the control issue. The package exists so the layout and the layering
contracts hold from the first commit.
"""
