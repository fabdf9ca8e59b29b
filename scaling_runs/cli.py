"""The command-line convention of every ``scaling_runs`` entry point (argparse).

* ``--help`` (or ``-h``) anywhere on the line prints the help and exits 0;
* an unknown option is a usage error (exit status 2, no traceback) that suggests the nearest
  known options; options are never abbreviated (``--lr`` is not ``--lr_...``);
* every option has a help text and shows its default;
* options are spelled with underscores (``--n_layer``); dashes are accepted (``--n-layer``);
* the config fields (``scaling_runs.config``: model / data / train sections) become options
  of their own name and type (``add_config_options``), also under their qualified name
  (``--model.n_layer``).
"""

import argparse
import dataclasses
import difflib
import sys
import typing

from .config import SECTION_TYPES, SECTIONS, RunConfig, config_fields, value_parser

HELP_FLAGS = ("-h", "--help")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and ``(default: X)`` after every option's help."""


def _normalize(arg: str) -> str:
    """``--n-layer=4`` -> ``--n_layer=4``: one spelling of option names (values untouched)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    key, eq, value = arg[2:].partition("=")
    return "--" + key.replace("-", "_") + eq + value


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the conventions of the module docstring."""

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, allow_abbrev=False, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        head = args[: args.index("--")] if "--" in args else args
        if any(a in HELP_FLAGS for a in head):  # before any value is checked: --help always works
            self.print_help()
            self.exit(0)
        normal = [_normalize(a) for a in head]
        self._typed = dict(zip(normal, head, strict=True))  # error messages quote what was typed
        return super().parse_known_args(normal + args[len(head):], namespace)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(self.unrecognized(extra))
        return ns

    def option_names(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def unrecognized(self, extra: list[str]) -> str:
        """The usage error for ``extra``: ``unrecognized arguments: --lrr 1 (--lrr: did you mean --lr?)``."""
        typed = getattr(self, "_typed", {})
        msg = "unrecognized arguments: " + " ".join(typed.get(a, a) for a in extra)
        names = self.option_names()
        hints = []
        for arg in extra:
            if arg.startswith("-"):
                near = difflib.get_close_matches(arg.split("=", 1)[0], names, n=4, cutoff=0.75)
                # --n_layer, not also its alias --model.n_layer
                near = [n for n in near if "." not in n or "--" + n.split(".", 1)[1] not in near][:3]
                if near:
                    hints.append(f"{typed.get(arg, arg).split('=', 1)[0]}: did you mean {' or '.join(near)}?")
        return msg + (f" ({'; '.join(hints)})" if hints else "")


def checked(check, name: str):
    """An argparse ``type`` that validates the text with ``check`` (its ValueError becomes the
    usage error "invalid NAME value") and passes the text on unchanged."""
    def conv(text: str) -> str:
        check(text)
        return text

    conv.__name__ = name
    return conv


def _metavar(typ, choices) -> str | None:
    if choices:
        return None  # argparse shows {a,b,c}
    optional = type(None) in typing.get_args(typ)
    base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
    name = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")
    return f"{name}|none" if optional else name


def _show(value) -> str:
    """A default as it would be typed: ``none``, ``true``, ``3e-3``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


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
