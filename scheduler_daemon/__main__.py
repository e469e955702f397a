"""``python -m scheduler_daemon`` is the same as the ``scheduler-daemon`` command."""

from scheduler_daemon.cli import main

raise SystemExit(main())
