"""Every filter type fastproxy knows, and how their configs plug into the schema.

A filter type brings its key in `[[routes]]` (a table checked against its own section, whose
keys carry their docs, so docs/config.md documents it), its compile step, and the class of
its compiled config (name, priority, phases, runtime class: see base.Filter). The schema
takes `route_keys()` (and `main_keys()`, the defaults of the filters that have one);
compile.py turns a checked route into its filters with `route_filters()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Tuple, Type

from fastproxy.config.schema import Invalid, Key, Section, Table, check_table

from . import compress, headers, mirror
from .base import CORE_PHASES, Filter


class FilterTable(Table):
    """A filter's table: checked against its section, then compiled by its build step. With
    `can_be_off` (a route's key for a filter [main] may default), `false` is taken too and
    stays False: this route has none, whatever [main] says."""

    def __init__(self, section: Section, build: Callable[[dict], Optional[Filter]], can_be_off: bool = False):
        super().__init__(section)
        self.build = build
        if can_be_off:
            self.types = (dict, bool)
            self.name = "table, or false"

    def convert(self, value):
        if value is False:
            return False
        if value is True:
            raise Invalid("true is not a table: write the table, or false to turn off the [main] default")
        problems: List[Tuple[str, str]] = []
        values = check_table(self.section.keys, value, "", lambda path, reason: problems.append(("." + path, reason)))
        try:
            compiled = self.build(values)
        except Invalid as error:  # rules across its keys, checked on the keys that were valid
            problems += error.problems
        if problems:
            raise Invalid(problems=problems)
        return compiled


@dataclass(frozen=True)
class FilterType:
    config: Type[Filter]  # its compiled config's class: config.name is its key in [[routes]]
    section: Section  # the keys of its table, with their docs
    # (config, checked values of `section`) -> compiled config, or None when there is nothing
    # to do; keys that were invalid are absent, and a rule across keys raises Invalid
    build: Callable[[Type[Filter], dict], Optional[Filter]]

    def __post_init__(self):
        if not self.config.phases <= CORE_PHASES:
            raise TypeError(f"filter {self.config.name} hooks phases the core does not run: "
                            f"{sorted(p.name for p in self.config.phases - CORE_PHASES)}")

    def key(self) -> Key:
        return Key(self.config.name, FilterTable(self.section, partial(self.build, self.config),
                                                 can_be_off=self.config.main_default), None, self.config.doc)

    def main_key(self) -> Key:
        return Key(self.config.name, FilterTable(self.section, partial(self.build, self.config)), None,
                   f"The `{self.config.name}` of every route that does not set its own; see `[[routes]]`.")


FILTERS: Tuple[FilterType, ...] = (
    FilterType(headers.RequestHeaders, headers.REQUEST_SECTION, headers.compile_transform),
    FilterType(headers.ResponseHeaders, headers.RESPONSE_SECTION, headers.compile_transform),
    FilterType(compress.Compress, compress.SECTION, compress.compile_compress),
    FilterType(mirror.Mirror, mirror.SECTION, mirror.compile_mirror),
)


def route_keys() -> Tuple[Key, ...]:
    return tuple(filter_type.key() for filter_type in FILTERS)


def main_keys() -> Tuple[Key, ...]:
    return tuple(filter_type.main_key() for filter_type in FILTERS if filter_type.config.main_default)


def route_filters(route: dict, main: Optional[dict] = None) -> Tuple[Filter, ...]:
    """The compiled filters of a checked route (a filter whose key was invalid is absent), with
    the defaults `main` (the checked [main]) gives a route that does not set its own."""
    filters = []
    for filter_type in FILTERS:
        name = filter_type.config.name
        value = route.get(name)
        if value is None and main is not None and filter_type.config.main_default:
            value = main.get(name)
        if value is not None and value is not False:
            filters.append(value)
    return tuple(filters)
