"""Process exit codes (documented in the operations guide) and the startup failure that carries one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_NOT_MIGRATED = 4
EXIT_ADDRESS_IN_USE = 5
EXIT_ALREADY_RUNNING = 6
#: ``import``: a world (or the whole file) was rejected; every other world was imported.
EXIT_INPUT_REJECTED = 7


class StartupError(RuntimeError):
    """A startup failure with a one-line reason and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
