"""registry-sensor: a passive monitor for Docker Registry (distribution / OCI) traffic."""

__version__ = "0.1.0"
