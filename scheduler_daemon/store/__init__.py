"""Everything that talks SQL: tables, migrations, the repository, leases."""
