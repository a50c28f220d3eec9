"""The ``drgw`` command line, one module per command group (see ``main``)."""

from gateway.cli.main import EXIT_CONFIG, build_parser, main

__all__ = ["EXIT_CONFIG", "build_parser", "main"]
