"""Deprecated name of :mod:`scheduler_daemon.generation` (renamed so one feature has one word); importing it warns."""

import sys
import warnings

from scheduler_daemon import generation

warnings.warn(
    "scheduler_daemon.jobs is now scheduler_daemon.generation; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
# The import system returns whatever sys.modules holds under this name once the module has run.
sys.modules[__name__] = generation
