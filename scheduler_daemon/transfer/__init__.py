"""Import and export files (``scheduler-daemon import``/``export``): worlds with their NPCs and sessions."""
