"""Options of the duplicates routes (/duplicates, /api/duplicates), read from a query or form.

The options of `cbir duplicates` (--include, --near, --similar, --index) and a page
of groups (page, per_page); an export or a move adds the person's choices (move,
keep: ids). Only the web's own syntax is checked here (ASCII numbers, sizes of
lists and pages): the kinds and threshold ranges are the API's checks
(pipeline/api/dedup.py), so the page and the CLI refuse the same values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import specs
from pipeline.web.failures import BadRequest
from pipeline.web.params import catalog_ids, integer

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 200
# Ids a person may have ticked or unticked against the default plan: a form of
# 100,000 ids is about 1 MB, well under the upload limit.
MAX_CHOICES = 100_000
# A threshold as a request sends it: ASCII digits only (float() also reads "٠.٩").
_NUMBER = re.compile(r"(?:[0-9]{1,3}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})")


@dataclass(frozen=True)
class DuplicateParams:
    """What one request asks for; None = the API's defaults (those of `cbir duplicates`)."""

    include: str | None = None
    near: float | None = None
    similar: float | None = None
    index: str = "exact"
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    def query(self) -> dict[str, Any]:
        """The arguments of `Session.duplicates`."""
        return {
            "include": self.include or ("exact", "near"),
            "near": self.near,
            "similar": self.similar,
            "index": self.index,
        }


def _threshold(name: str, value: str) -> float:
    if not _NUMBER.fullmatch(value.strip()):
        raise BadRequest(f"{name} must be a number above 0 and at most 1, got {value[:40]!r}")
    return float(value)


def _count(name: str, value: Any, hi: int) -> int:
    n = integer(value)
    if not isinstance(n, int) or not 1 <= n <= hi:
        raise BadRequest(f"{name} must be an integer from 1 to {hi:,}")
    return n


def from_args(args: Mapping[str, Any]) -> DuplicateParams:
    """From a query string or form (a werkzeug MultiDict); empty fields are not given."""

    def given(key: str) -> str | None:
        value = args.get(key)
        return value if value not in (None, "") else None

    near, similar, index = given("near"), given("similar"), given("index")
    page, per_page = given("page"), given("per_page")
    return DuplicateParams(
        include=given("include"),
        near=_threshold("near", near) if near is not None else None,
        similar=_threshold("similar", similar) if similar is not None else None,
        index=specs.check("index", index) if index is not None else "exact",
        page=_count("page", page, 10**9) if page is not None else 1,
        per_page=_count("per_page", per_page, MAX_PER_PAGE)
        if per_page is not None
        else DEFAULT_PER_PAGE,
    )


def choices(form: Mapping[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(move, keep): the ids a person ticked or unticked against the default plan."""
    move = catalog_ids("move", form.getlist("move"), MAX_CHOICES)
    keep = catalog_ids("keep", form.getlist("keep"), MAX_CHOICES)
    both = sorted(set(move) & set(keep))
    if both:
        raise BadRequest(f"ids both to move and to keep: {both[:5]}")
    return move, keep
