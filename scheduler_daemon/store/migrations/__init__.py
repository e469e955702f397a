"""Alembic migrations shipped inside the package (``scheduler-daemon db upgrade``)."""
