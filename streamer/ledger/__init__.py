"""The ledger: the only module that speaks SQL (schema, migrations, transitions, queries)."""
