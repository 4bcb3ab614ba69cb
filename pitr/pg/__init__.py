"""PostgreSQL knowledge: WAL names and headers, base-backup layout, server sessions, recovery settings."""
