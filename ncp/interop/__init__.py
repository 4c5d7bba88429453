"""Adapters between ncp and other meta-learning code, one optional submodule each.

Import the adapter you need, e.g. ``import ncp.interop.higher``; this package imports none of
them, so ``import ncp`` never pulls in an optional dependency.
"""
