"""Reading a config file: TOML text -> checked values -> Runtime, or every problem at once."""
from __future__ import annotations

import os

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from ..errors import ConfigError, Problem
from .compile import build_runtime, check_references
from .runtime import Runtime
from .schema import SOURCE, check_tree

# tomllib puts the position only in its message: "Invalid value (at line 3, column 9)".
_POSITION = re.compile(r"(.*) \(at line (\d+), column (\d+)\)", re.DOTALL)


def read_toml(path: str) -> dict:
    """The parsed document; a ConfigError for a file that cannot be read or is not TOML."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError([Problem(path, "", f"cannot read: {error.strerror}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([Problem(path, "", f"not UTF-8 text (byte {error.start})")]) from None
    except tomllib.TOMLDecodeError as error:
        match = _POSITION.fullmatch(str(error))
        if match:
            problem = Problem(path, "", f"invalid TOML: {match[1]}", int(match[2]), int(match[3]))
        else:
            problem = Problem(path, "", f"invalid TOML: {error}")
        raise ConfigError([problem]) from None


def load_runtime(path: str) -> Runtime:
    """Read, check and compile the config file at `path`.

    This is all `fastproxy -t` and a reload do. Raises ConfigError listing every problem
    found; nothing is built unless the whole file is valid.
    """
    problems = []

    def report(key_path: str, reason: str) -> None:
        problems.append(Problem(path, key_path, reason))

    tree = check_tree(read_toml(path), report)
    tree[SOURCE] = os.path.abspath(path)  # what relative paths in checks are against
    check_references(tree, report)
    if problems:
        raise ConfigError(problems)
    return build_runtime(tree, path)
