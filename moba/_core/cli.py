"""The command-line convention shared by every tool in ``bench/`` and ``scaling_runs/`` (argparse).

Both folders import it from here (they may import ``moba._core``, never each other):

* ``--help`` (or ``-h``) anywhere on the line prints the help and exits 0;
* options are spelled with underscores (``--block_size``, ``--top_k``: the names of the Python
  parameters they set); the same name with dashes (``--block-size``) is accepted everywhere;
* options are never abbreviated; an unknown option is a usage error that suggests the nearest
  known ones, and so is an unknown name in a list value (``names``);
* every option has a help text that shows its default (``HelpFormatter``);
* a bad value, a missing file or an empty folder is a one-line error that names the option and
  the value it expects (``CliError``, the argparse ``type`` helpers below), exit status 2;
* ``run(main)`` runs a tool's ``main``: any error ends in one line on stderr, never a Python
  traceback, unless ``--debug`` is on the command line (every ``Parser`` accepts it).

Only the standard library here: a tool's ``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .sizes import parse_block_topk, parse_size

HELP_FLAGS = ("-h", "--help")
DEBUG_FLAG = "--debug"

#: exit status of a usage error (argparse's) and of a failed run
EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user error with a one-line message (``run`` prints ``PROG: error: MESSAGE``, exit 2)."""


def fail(message: str) -> CliError:
    """``raise fail("--out: ...")``: the error ``run`` turns into one line."""
    return CliError(message)


# ------------------------------------------------------------------------------- the parser
def _show(value) -> str:
    """A default as it would be typed: ``none``, ``true``, ``3e-3``, ``a,b`` for a list."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ",".join(_show(v) for v in value)
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The tool's docstring as written, and ``(default: X)`` after each option's help, unless the
    help already says its default (the word "default") or the option has none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is argparse.SUPPRESS
                or "default" in text.lower() or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: {_show(action.default).replace('%', '%%')})".lstrip()


class BooleanOptionalAction(argparse.BooleanOptionalAction):
    """``--causal`` / ``--no_causal`` (argparse's own spells the negative ``--no-causal``)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.option_strings = [s.replace("--no-", "--no_", 1) if s.startswith("--no-") else s
                               for s in self.option_strings]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, not option_string.startswith("--no_"))


def _key(option: str) -> str:
    """The spelling-free key of an option name: ``--block-size`` and ``--block_size`` -> ``--block_size``."""
    return "--" + option[2:].replace("-", "_")


def suggest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The known names closest to a typo (``difflib``), best first."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'passkey'?)`` or ``""``."""
    near = suggest(word, choices)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the conventions of the module docstring."""

    def __init__(self, prog: str | None = None, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, allow_abbrev=False, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                          help="show the Python traceback of an error instead of its one-line message (default: off)")

    def add_argument(self, *args, **kwargs):
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            kwargs["action"] = BooleanOptionalAction
        return super().add_argument(*args, **kwargs)

    def option_names(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def _normalize(self, arg: str, known: dict[str, str]) -> str:
        """``--block-size=4`` -> ``--block_size=4`` when that is how the option is registered."""
        if not arg.startswith("--") or arg == "--":
            return arg
        key, eq, value = arg.partition("=")
        return known.get(_key(key), key) + eq + value

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        head = args[: args.index("--")] if "--" in args else args
        if any(a in HELP_FLAGS for a in head):  # before any value is checked: --help always works
            self.print_help()
            self.exit(0)
        known = {_key(n): n for n in self.option_names()}
        normal = [self._normalize(a, known) for a in head]
        self._typed = dict(zip(normal, head, strict=True))  # error messages quote what was typed
        return super().parse_known_args(normal + args[len(head):], namespace)

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.error(self.unrecognized(extra))
        return ns

    def unrecognized(self, extra: list[str]) -> str:
        """The usage error for ``extra``: ``unrecognized arguments: --lrr 1 (--lrr: did you mean --lr?)``."""
        typed = getattr(self, "_typed", {})
        msg = "unrecognized arguments: " + " ".join(typed.get(a, a) for a in extra)
        names = self.option_names()
        hints = []
        for arg in extra:
            if arg.startswith("-"):
                word = _key(arg.split("=", 1)[0]) if arg.startswith("--") else arg
                near = difflib.get_close_matches(word, names, n=4, cutoff=0.75)
                # --n_layer, not also its alias --model.n_layer
                near = [n for n in near if "." not in n or "--" + n.split(".", 1)[1] not in near][:3]
                if near:
                    hints.append(f"{typed.get(arg, arg).split('=', 1)[0]}: did you mean {' or '.join(near)}?")
        return msg + (f" ({'; '.join(hints)})" if hints else "")

    def _check_value(self, action, value):
        # an invalid choice names the nearest ones ("did you mean ...?")
        if action.choices is not None and value not in action.choices:
            shown = ", ".join(map(repr, action.choices))
            hint = did_you_mean(str(value), [str(c) for c in action.choices])
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint}; choose from {shown}")


# ------------------------------------------------------------------------------- value types
def _typed(fn: Callable, name: str) -> Callable:
    fn.__name__ = name
    return fn


def checked(check: Callable[[str], object], name: str | None = None) -> Callable[[str], str]:
    """An argparse ``type`` that validates the text with ``check`` and passes the text on
    unchanged; a ValueError from ``check`` becomes the usage error, with its message when it
    has one ("invalid NAME value" otherwise)."""
    name = name or getattr(check, "__name__", "value").lstrip("_")

    def conv(text: str) -> str:
        try:
            check(text)
        except (ValueError, TypeError) as e:
            if str(e):
                raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}: {e}") from None
            raise
        return text

    return _typed(conv, name)


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low``."""
    expected = f"a whole number >= {low}"

    def conv(text: str) -> int:
        value = _int(text, expected)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return _typed(conv, expected)


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in a range (``float_in(0, low_open=True)``: > 0)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a number" + (" " + " and ".join(parts) if parts else "")

    def conv(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        bad = (value != value or value in (float("inf"), float("-inf"))
               or (low is not None and (value <= low if low_open else value < low))
               or (high is not None and (value >= high if high_open else value > high)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return _typed(conv, expected)


positive_float = float_in(0, low_open=True)


def size(text: str) -> int:
    """An argparse type: a token count, ``512``, ``8k``, ``1m`` (``moba._core.sizes.parse_size``)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected a size >= 1 such as 512, 8k or 1m") from None


def _items(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    if not all(items):
        raise argparse.ArgumentTypeError(f"an empty entry in {text!r}")
    return items


def list_of(item: Callable[[str], object], expected: str) -> Callable[[str], list]:
    """An argparse type: a comma-separated list whose entries ``item`` parses (at least one)."""

    def conv(text: str) -> list:
        out, parts = [], _items(text)
        for part in parts:
            try:
                out.append(item(part))
            except (ValueError, argparse.ArgumentTypeError) as e:
                where = f"{part!r} in {text!r}: " if len(parts) > 1 else ""
                raise argparse.ArgumentTypeError(f"{where}{e}") from None
        return out

    return _typed(conv, f"list of {expected}")


size_list = list_of(size, "sizes")


def names(allowed: Sequence[str], what: str = "name") -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``allowed``; a typo names the nearest."""
    allowed = list(allowed)

    def conv(text: str) -> list[str]:
        items = _items(text)
        for item in items:
            if item not in allowed:
                raise argparse.ArgumentTypeError(
                    f"unknown {what} {item!r}{did_you_mean(item, allowed)}; expected some of: {', '.join(allowed)}")
        return items

    return _typed(conv, f"{what} list")


def block_topk(text: str) -> tuple[int, int]:
    """An argparse type: one ``BLOCK/TOP_K`` setting (``512/3``) -> ``(block_size, top_k)``."""
    try:
        return parse_block_topk(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


block_topk_list = list_of(block_topk, "BLOCK/TOP_K settings")


def existing_file(text: str) -> str:
    """An argparse type: a file that exists (the text is passed on unchanged)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file")
    return text


def existing_path(text: str) -> str:
    """An argparse type: a file or a folder that exists (the text is passed on unchanged)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r}")
    return text


def existing_dir(text: str) -> str:
    """An argparse type: a folder that exists and is not empty (the text is passed on unchanged)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder")
    if not any(path.iterdir()):
        raise argparse.ArgumentTypeError(f"the folder {text!r} is empty")
    return text


# ------------------------------------------------------------------------------- running a tool
def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """``--debug`` on the command line (before any ``--``), or ``MOBA_DEBUG=1`` in the environment."""
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[: argv.index("--")] if "--" in argv else argv
    return DEBUG_FLAG in head or os.environ.get("MOBA_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(main: Callable[[], object], module: str | None = None) -> int:
    """Run a tool's ``main()`` and return its exit status, errors as one line on stderr
    (``python -m MODULE: error: ...``, as argparse words its usage errors).

    ``main`` returns None/0 (success), an int (an exit status) or anything else (success). A
    ``CliError`` or an ``OSError`` (a missing or unreadable file) exits 2 with its message; any
    other exception exits 1 with its type and message and a pointer to ``--debug``, which
    re-raises it (the full traceback). ``sys.exit("message")`` prints the message as that one
    line (exit 1); other ``SystemExit`` (argparse's usage errors, ``sys.exit(N)``) pass through;
    Ctrl-C exits 130.
    """
    prog = f"python -m {module}" if module else Path(sys.argv[0]).name
    if debug_requested():
        result = main()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    try:
        result = main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        # sys.exit("message"): the message as the tool's one error line, exit status 1
        text = _one_line(e.code)
        print(f"{prog}: {text if text.startswith('error:') else 'error: ' + text}", file=sys.stderr)
        return EXIT_FAILED
    except CliError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001  (one line for everything; --debug shows the traceback)
        print(f"{prog}: error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


_DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


def device(text: str) -> str:
    """An argparse type: a torch device string, ``cpu``, ``cuda`` or ``cuda:N`` (also mps, xpu)."""
    kind, sep, index = str(text).partition(":")
    if kind not in _DEVICE_KINDS or (sep and not index.isdigit()):
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {text!r}{did_you_mean(kind, _DEVICE_KINDS)}")
    return text
