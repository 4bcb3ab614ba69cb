"""Test helpers: real PostgreSQL clusters (run as the `postgres` OS user) and a moto S3 server."""
