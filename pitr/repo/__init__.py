"""The repository format: keys, object envelope, metadata, manifests, catalog queries."""
