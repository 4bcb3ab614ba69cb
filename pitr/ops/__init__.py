"""Operations: one module per command's logic, grouped by area (base, recovery, wal, proof,
surgical, admin; docs/ARCHITECTURE.md). No typer, no printing, no exiting."""
