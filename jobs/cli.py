"""Command-line parsing shared by the jobs: dotted flags onto a dataclass tree (draccus)."""
from __future__ import annotations

import sys
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def parse_config(config_class: type[T], argv: list[str] | None = None) -> T:
    """Parse argv into `config_class`; a bad value raises ConfigError with the message of the
    innermost error (draccus wraps our __post_init__ errors, which name the field)."""
    import draccus

    try:
        return draccus.parse(config_class=config_class, args=argv)
    except (ValueError, TypeError, draccus.utils.ParsingError) as exc:
        while exc.__cause__ is not None:
            exc = exc.__cause__
        raise ConfigError(str(exc)) from None


def parse_or_exit(config_class: type[T], argv: list[str] | None = None) -> T:
    """parse_config, or print 'configuration error: ...' and exit with status 2."""
    try:
        return parse_config(config_class, argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
