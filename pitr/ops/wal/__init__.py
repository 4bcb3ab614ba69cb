"""The WAL archive path: push and fetch of one file, the async helpers, the stage, WAL reach."""
