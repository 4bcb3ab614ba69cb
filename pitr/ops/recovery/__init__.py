"""Restore: the plan, the destination, the file writers and the replay."""
