"""Run configs: ``peftlab train --config run.yaml`` (or ``.json``), and the options a resumed run
takes from the run it continues (``DIR/run_config.json``).

A run config maps option names to values: the names of the command line's options with ``_`` for
``-`` (``max_steps: 100``; ``max-steps`` is read too). The keys it may hold are read from the
argument parser itself (:func:`config_actions`), so an option added to ``peftlab train`` is a valid
key at once. Options given on the command line win over the file (:func:`given_options` tells
which were given). An unknown key is an error naming it, suggesting the nearest valid key and
listing them all; a value of the wrong type names the key and the type expected.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Options that are not run settings: they cannot appear in a run config.
NOT_CONFIG_KEYS = frozenset({"help", "config", "resume"})
#: Keys a run config may hold beside the options: structured values that their own code checks
#: (``adapters``: the adapters of a joint run, :func:`peftlab.train.multi_options.requested_adapters`).
STRUCTURED_KEYS = frozenset({"adapters"})
CONFIG_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
#: Written into ``--out`` when a run starts: every option's value (``peftlab train --config`` reads it).
RUN_CONFIG_FILE = "run_config.json"
#: Options a resumed run may change: they do not change what is computed.
RESUME_MAY_CHANGE = frozenset({"no_progress", "device", "keep_checkpoints"})

AddArguments = Callable[[argparse.ArgumentParser], None]


class RunConfigError(ValueError):
    """A run config that cannot be used (the message names the file and the key)."""


def config_actions(add_arguments: AddArguments) -> dict[str, argparse.Action]:
    """The keys a run config may hold (each option's ``dest``) and their argparse actions, for the
    options ``add_arguments`` adds to a parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_CONFIG_KEYS}


def given_options(add_arguments: AddArguments, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option given in ``argv`` (the subcommand's own arguments): parsed again
    with every default suppressed, so that only what the user typed appears."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    namespace, _ = parser.parse_known_args(list(argv))
    return set(vars(namespace))


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction))


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)


def expected_type(action: argparse.Action) -> str:
    """How a run config must write a value of ``action``'s option, in words."""
    if _is_flag(action):
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    kind = action.type or str
    word = {int: "an integer", float: "a number", str: "a string"}.get(kind, f"a {getattr(kind, '__name__', kind)}")
    if kind is str and "comma" in (action.help or ""):
        word += " (comma-separated) or a list"
    return f"{word} or a list of {word.removeprefix('a ').removeprefix('an ')}s" if _is_list(action) else word


def _scalar(value: Any, action: argparse.Action) -> Any:
    """``value`` as the option's type, or raise TypeError."""
    kind = action.type or str
    if isinstance(value, bool):
        raise TypeError
    if kind in (int, float) and isinstance(value, str):
        # As on the command line; YAML also reads 1e-4 (no dot) as a string.
        try:
            value = kind(value)
        except ValueError:
            raise TypeError from None
    if kind is int:
        if not isinstance(value, int):
            raise TypeError
    elif kind is float:
        if not isinstance(value, (int, float)):
            raise TypeError
        value = float(value)
    elif kind is str:
        if isinstance(value, list) and value and "comma" in (action.help or "") and \
                all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            value = ",".join(map(str, value))
        elif isinstance(value, (str, int, float)):
            value = str(value)
        else:
            raise TypeError
    elif isinstance(value, (str, int, float)):
        try:
            value = kind(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise TypeError from None
    else:
        raise TypeError
    if action.choices is not None and value not in action.choices:
        raise TypeError
    return value


def check_value(key: str, value: Any, action: argparse.Action, source: str) -> Any:
    """``value`` of ``key`` converted as the command line would (a float for ``lr: 1``), or a
    :class:`RunConfigError` naming the key and the type expected."""
    try:
        if value is None:
            if action.default is None:
                return None
            raise TypeError
        if _is_flag(action):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if _is_list(action):
            return [_scalar(v, action) for v in (value if isinstance(value, list) else [value])]
        return _scalar(value, action)
    except TypeError:
        raise RunConfigError(f"{source}: {key} must be {expected_type(action)}, got {value!r} "
                             f"({_type_name(value)})") from None


def check_config(data: dict[Any, Any], actions: dict[str, argparse.Action], source: str) -> dict[str, Any]:
    """Validate a run config's mapping against the known ``actions``: keys (``-`` read as ``_``)
    and value types. Returns ``{dest: value}``."""
    out = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if key in STRUCTURED_KEYS:
            out[key] = value
            continue
        if action is None:
            known = [*actions, *STRUCTURED_KEYS]
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RunConfigError(f"{source}: unknown key {raw_key!r}{hint}; valid keys: {', '.join(sorted(known))}")
        out[key] = check_value(key, value, action, source)
    return out


def read_config_file(path: str | Path) -> dict[Any, Any]:
    """The mapping a ``.yaml``/``.yml``/``.json`` file holds (an empty file is an empty mapping)."""
    path = Path(path)
    kind = CONFIG_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise RunConfigError(f"run config {path}: unknown format {path.suffix or '(no extension)'!r}; "
                             "use .yaml, .yml or .json")
    if not path.is_file():
        raise RunConfigError(f"run config {path} not found")
    text = path.read_text()
    if kind == "json":
        try:
            data = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            raise RunConfigError(f"run config {path} is not valid JSON: {err.msg} (line {err.lineno}, "
                                 f"column {err.colno})") from None
    else:
        import yaml  # noqa: PLC0415

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise RunConfigError(f"run config {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunConfigError(f"run config {path} must be a mapping of option: value (e.g. max_steps: 100), "
                             f"not {_type_name(data)}")
    return data


def load_run_config(path: str | Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """Read and validate the run config at ``path`` (:func:`read_config_file`, :func:`check_config`)."""
    return check_config(read_config_file(path), actions, f"run config {path}")


def write_run_config(directory: str | Path, args: argparse.Namespace, actions: dict[str, argparse.Action]) -> Path:
    """Write every option's value in ``args`` as ``directory/run_config.json``: what ``--resume``
    reads, and a run config ``--config`` accepts."""
    path = Path(directory) / RUN_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {key: getattr(args, key) for key in sorted(actions) if hasattr(args, key)}
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def resolve_run_args(args: argparse.Namespace, argv: Sequence[str], add_arguments: AddArguments) -> argparse.Namespace:
    """``args`` (parsed from ``argv``, the subcommand's arguments) with ``--config`` and ``--resume``
    applied: a config's values fill the options not given on the command line; a resumed run takes
    the options of the run it continues (``DIR/run_config.json``), and an option given that differs
    from the saved one is an error (except :data:`RESUME_MAY_CHANGE`); ``out`` becomes ``DIR``."""
    actions = config_actions(add_arguments)
    given = given_options(add_arguments, argv)
    if getattr(args, "config", None):
        config = load_run_config(args.config, actions)
        for key, value in config.items():
            if key not in given:
                setattr(args, key, value)
        given |= set(config)
    if getattr(args, "resume", None):
        directory = Path(args.resume)
        saved_path = directory / RUN_CONFIG_FILE
        if not saved_path.is_file():
            raise RunConfigError(f"--resume {directory}: no {RUN_CONFIG_FILE} there; give the --out folder of a "
                                 "peftlab train run (it is written when the run starts)")
        saved = load_run_config(saved_path, actions)
        if "out" in given and Path(args.out).resolve() != directory.resolve():
            raise RunConfigError(f"--resume {directory} continues that run in its own folder; leave out --out "
                                 f"(given: {args.out})")
        differ = [f"{key}={getattr(args, key)!r} (the run has {saved[key]!r})" for key in sorted(given & set(saved))
                  if key not in RESUME_MAY_CHANGE | {"out"} and getattr(args, key) != saved[key]]
        if differ:
            raise RunConfigError(f"--resume {directory} continues the run as it was started; these options differ "
                                 f"from it: {', '.join(differ)}. Leave them out, or start a new run with another --out")
        for key, value in saved.items():
            if key not in given:
                setattr(args, key, value)
        args.out = str(directory)
    return args
