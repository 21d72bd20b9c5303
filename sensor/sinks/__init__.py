"""I/O edge: where records go: SQLite, alerts, JSON lines."""
