"""Errors of a whole sweep, apart from the modules that raise them so that any may (sweep/search.py
and sweep/driver.py both do) without importing the other."""

from __future__ import annotations


class SweepError(RuntimeError):
    """The sweep ran but produced nothing to export (every trial failed)."""
