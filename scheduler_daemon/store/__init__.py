"""Everything that talks SQL: tables, migrations, and ``Store`` (:mod:`.repository`), built from one module per concern.

Errors are in :mod:`.errors`; what the scheduler needs of a store is :mod:`.protocol`.
"""
