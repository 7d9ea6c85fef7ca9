"""Runnable handlers: ``forkserver run forkserver.examples.echo:handle``."""
