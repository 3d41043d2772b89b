"""The per-server daemon: snapshots sources, serves and fetches chunks, installs files."""
