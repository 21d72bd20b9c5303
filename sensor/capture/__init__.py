"""I/O edge: where packets come from: capture files and live sockets."""
