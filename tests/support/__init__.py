"""What the tests share and are not tests: world builders and injected database faults
(``helpers``), behaviour plug-ins and generation sinks that daemon subprocesses load by
``module:callable`` spec (``plugins``, ``sinks``), several daemons on one PostgreSQL
database (``cluster``) and the admin API fuzzer (``api_fuzz``).

Daemon subprocesses import ``tests.support.…`` because they run with the
repository root as working directory and on ``PYTHONPATH``.
"""
