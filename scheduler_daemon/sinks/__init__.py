"""Generation sinks shipped with the daemon, named in ``[generation] sink`` like any other.

``scheduler_daemon.sinks.arq:enqueue`` hands each claimed request to an ARQ
worker through Redis (extra ``scheduler-daemon[arq]``).
"""
