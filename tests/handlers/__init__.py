"""Handlers the daemon tests run inside real workers."""
