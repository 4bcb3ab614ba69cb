"""Repository administration: init, keys, Object Lock, retention, the store check, info."""
