"""Proof that the repository restores: verify, drill, metrics, check and the proof ages."""
