"""The command-line convention of every ``scaling_runs`` entry point (argparse).

The parser is ``moba._core.cli.Parser``, shared with ``bench/`` (its docstring has the rules:
``--help`` anywhere, underscores with dashes accepted, no abbreviations, typo suggestions,
defaults shown, one-line errors, ``--debug``). This module adds the config options:

* the config fields (``scaling_runs.config``: model / data / train sections) become options
  of their own name and type (``add_config_options``), also under their qualified name
  (``--model.n_layer``).
"""

import argparse
import dataclasses
import typing

from moba._core.cli import HELP_FLAGS, HelpFormatter, Parser, _show, checked  # noqa: F401  (re-exported)

from .config import SECTION_TYPES, SECTIONS, RunConfig, config_fields, value_parser


def _metavar(typ, choices) -> str | None:
    if choices:
        return None  # argparse shows {a,b,c}
    optional = type(None) in typing.get_args(typ)
    base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
    name = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")
    return f"{name}|none" if optional else name


def add_config_options(parser: argparse.ArgumentParser, defaults: RunConfig | None = None,
                       default_note: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """One option per config field, in a group per section: ``--NAME`` and ``--SECTION.NAME``.

    The options default to "not given" (``config_overrides`` returns only what was typed, so
    they apply on top of a preset or a ``--config`` file); the help shows ``defaults``'s value
    (``RunConfig()``'s when None), or ``default_note`` instead when given. ``skip``: qualified
    names (``data.mix_fraction``) the caller defines itself.
    """
    defaults = defaults or RunConfig()
    for sec in SECTIONS:
        typ = SECTION_TYPES[sec]
        group = parser.add_argument_group(f"{sec} options ({typ.__name__}, scaling_runs.config)")
        for f in dataclasses.fields(typ):
            qual = f"{sec}.{f.name}"
            if qual in skip:
                continue
            shown = default_note or _show(getattr(getattr(defaults, sec), f.name))
            choices = f.metadata.get("choices")
            group.add_argument(f"--{f.name}", f"--{qual}", dest=qual, type=value_parser(f.type),
                               default=argparse.SUPPRESS, choices=choices, metavar=_metavar(f.type, choices),
                               help=f"{f.metadata['help']} (default: {shown})")


def config_overrides(ns: argparse.Namespace) -> dict[str, object]:
    """The config options given on the command line: ``{"model.n_layer": 4, ...}`` (typed)."""
    known = config_fields()
    return {k: v for k, v in vars(ns).items() if k in known}
