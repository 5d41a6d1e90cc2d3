"""jsonargparse's config errors as one line that names the bad key and the closest valid names.

A misspelt key makes jsonargparse print its usage, then a report on every type of a Union
(``Does not validate against any of the Union subtypes ...``). :func:`explain` reads that report and says, in one
line, which key is unknown, which class it was given to, and the valid names closest to it; a setting that moved
(the optimizer recipe left the model for its own ``optim`` section) says where it lives now.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from typing import Any, Iterable

from kd_lightning.optim import MOVED_TO_OPTIM

_OPTION = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*Option '([^']+)' is not accepted")
_NESTED = re.compile(r"Given value: NestedArg\(key='([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (difflib), or a few of them when none is close."""
    valid = sorted(set(valid))
    leaf = {v.rsplit(".", 1)[-1]: v for v in valid}
    near = difflib.get_close_matches(name, valid, n=n, cutoff=0.6)
    near += [leaf[m] for m in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaf), n=n, cutoff=0.6)
             if leaf[m] not in near]
    return near[:n]


def _init_arguments(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _parser_keys(parser: Any) -> list[str]:
    """The parser's settable keys (``trainer.max_epochs``), without the groups that hold them (``trainer``)."""
    keys = [a.dest for a in getattr(parser, "_actions", []) if getattr(a, "dest", "")
            and a.dest not in ("help", "config", "print_config")]
    return [k for k in keys if not any(other.startswith(k + ".") for other in keys)]


def explain(message: str, parser: Any = None) -> str:
    """One line for jsonargparse's error ``message``; ``parser``: the (sub)command's parser, for valid names."""
    options = _OPTION.findall(message)
    if options:
        class_path, option = options[-1]  # the innermost class that refused the option
        cls = class_path.rsplit(".", 1)[-1]
        nested = _NESTED.findall(message)
        parser_key = _PARSER_KEY.search(message)
        root = parser_key.group(1) if parser_key else ""
        key = f"{root}.init_args.{nested[-1] if nested else option}" if root else option
        if option in MOVED_TO_OPTIM and class_path.startswith("kd_lightning."):
            return (f"'{key}': the optimizer and LR schedule are not model arguments any more but a section of "
                    f"their own: write `optim: {{{option}: ...}}` at the top level of the config (or --optim.{option} "
                    f"VALUE); its keys: {', '.join(MOVED_TO_OPTIM)}.")
        near = closest(option, _init_arguments(class_path))
        return (f"unknown key '{key}': {cls} has no argument '{option}'"
                + (f"; closest valid names: {', '.join(near)}." if near else
                   f"; its arguments: {', '.join(_init_arguments(class_path))}."))
    unrecognized = _UNRECOGNIZED.search(message)
    if unrecognized:
        keys = [t[2:].split("=", 1)[0] for t in unrecognized.group(1).split() if t.startswith("--")]
        if keys:
            near = closest(keys[0], _parser_keys(parser)) if parser is not None else []
            return (f"unknown key '{keys[0]}'" + (f" (and {', '.join(keys[1:])})" if keys[1:] else "")
                    + (f"; closest valid names: {', '.join(near)}." if near else "."))
    return condense(message)


_TYPE_ERROR = re.compile(r'Parser key "([^"]+)":\s*\n\s*Does not validate against any of the Union subtypes.*?'
                         r"Given value: (.*)$", re.DOTALL)
_EXPECTED = re.compile(r"Expected a <class '([^']+)'>")


def condense(message: str) -> str:
    """Any other jsonargparse report on one line: a wrong type says what was expected; a class's own problem is
    kept rather than every Union member's."""
    wrong_type = _TYPE_ERROR.search(message)
    if wrong_type and "Problem with given class_path" not in message:
        expected = [name.replace("NoneType", "null") for name in _EXPECTED.findall(message)]
        return (f"'{wrong_type.group(1)}' cannot be {wrong_type.group(2).strip()!r}: expected "
                f"{' or '.join(expected) or 'another value'}.")
    lines = message.splitlines()
    problem = next((i for i, line in enumerate(lines) if line.strip().startswith("- Problem with given class_path")),
                   None)
    if problem is not None:
        indent = len(lines[problem]) - len(lines[problem].lstrip())
        detail = [lines[problem].strip()[2:]]
        for line in lines[problem + 1:]:
            if len(line) - len(line.lstrip()) <= indent:
                break
            detail.append(line)
        lines = [lines[0], *detail]
    return " ".join(" ".join(lines).split())
