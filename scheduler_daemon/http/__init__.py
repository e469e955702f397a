"""The daemon's HTTP surface: the admin API (``/api/v1``), ``/metrics``, ``/healthz``, ``/readyz``.

``routes`` (the FastAPI app, thin routes over :class:`~scheduler_daemon.admin.WorldAdmin`),
``wire`` (pydantic models), ``auth`` (admin token), ``middleware`` (body size limit),
``connections`` (connection limit and request deadline), ``server`` (uvicorn in the daemon's loop).
"""
