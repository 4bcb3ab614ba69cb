"""Surgical recovery: find the transaction that hurt a table, extract its rows as they were."""
