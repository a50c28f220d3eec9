"""What every command module shares: exit codes, config refusals, argparse types."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gateway.errors import ConfigError

EXIT_CONFIG = 2


def refuse(problems: Sequence[ConfigError]) -> int:
    """Print one line per config problem and return the config exit code."""
    for err in problems:
        print(f"config error: {err}", file=sys.stderr)
    return EXIT_CONFIG


def count(minimum: int) -> Callable[[str], int]:
    """Return an argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value

    return parse
