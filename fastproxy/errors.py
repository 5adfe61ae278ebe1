"""Exceptions raised by fastproxy outside the request path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional


class FastproxyError(Exception):
    """Base of every error fastproxy raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file.

    `key_path` locates it in the TOML tree (`routes[1].respond.status`, indices from 0);
    it is empty for problems with the file itself, where `line`/`column` may say where.
    """
    file: str
    key_path: str
    reason: str
    line: Optional[int] = None
    column: Optional[int] = None

    def __str__(self) -> str:
        where = self.key_path
        if not where and self.line is not None:
            where = f"line {self.line}, column {self.column}"
        return ": ".join(part for part in (self.file, where, self.reason) if part)


class ConfigError(FastproxyError):
    """A config file that cannot be used; `problems` lists everything found, not just the first."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))
