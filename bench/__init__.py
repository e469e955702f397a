"""Benchmarks: the scheduler against APScheduler, a bare heap loop, a naive ORM tick and raw SQL.

Run ``make bench`` (full) or ``make bench-quick``; see ``python -m bench --help``.
"""
