"""pitr: PostgreSQL point-in-time recovery (base backups, WAL archive, restore to any moment)."""

__version__ = "0.1.0"
