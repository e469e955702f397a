"""Import and export files: worlds with their NPCs and sessions, as JSON or NDJSON (``scheduler-daemon import``/``export``)."""
