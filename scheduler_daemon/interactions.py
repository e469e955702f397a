"""Deprecated name of :mod:`scheduler_daemon.chains` (renamed so one feature has one word); importing it warns."""

import sys
import warnings

from scheduler_daemon import chains

warnings.warn(
    "scheduler_daemon.interactions is now scheduler_daemon.chains; the old name will be removed",
    DeprecationWarning,
    stacklevel=2,
)
# The import system returns whatever sys.modules holds under this name once the module has run.
sys.modules[__name__] = chains
