"""Base backups: the copy pipeline, block-level diff/incr, standby backups."""
