"""Command-line parsing shared by the jobs: dotted flags onto a dataclass tree (draccus)."""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def parse_config(config_class: type[T], argv: list[str] | None = None) -> T:
    """Parse argv into `config_class`; a bad value raises ConfigError with the message of the
    innermost error (draccus wraps our __post_init__ errors, which name the field)."""
    import draccus

    defaults = factory_defaults(config_class)
    try:
        if not defaults:
            return draccus.parse(config_class=config_class, args=argv)
        # JSON is YAML, and it has no tags for tuples
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            json.dump(defaults, file)
            file.flush()
            return draccus.parse(config_class=config_class, config_path=file.name, args=argv)
    except (ValueError, TypeError, draccus.utils.ParsingError) as exc:
        while exc.__cause__ is not None:
            exc = exc.__cause__
        raise ConfigError(str(exc)) from None


def factory_defaults(config_class: type) -> dict[str, Any]:
    """The values of nested dataclass fields whose default_factory differs from their class's own
    defaults, e.g. TrainPolicyConfig.model = default_model(). draccus builds a nested dataclass
    from its class defaults as soon as one of its fields is on the command line (`--model.x=1`
    would silently drop every other value of default_model()); handing draccus these values as
    a config file makes command-line flags override them one by one instead."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_class):
        if f.default_factory is dataclasses.MISSING:
            continue
        value = f.default_factory()
        if not dataclasses.is_dataclass(value):
            continue
        try:
            plain = type(value)()
        except (TypeError, ValueError):   # no defaults of its own: every value is the factory's
            plain = None
        if value != plain:
            out[f.name] = json.loads(json.dumps(dataclasses.asdict(value)))
        else:
            nested = factory_defaults(type(value))
            if nested:
                out[f.name] = nested
    return out


def parse_or_exit(config_class: type[T], argv: list[str] | None = None) -> T:
    """parse_config, or print 'configuration error: ...' and exit with status 2."""
    try:
        return parse_config(config_class, argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
