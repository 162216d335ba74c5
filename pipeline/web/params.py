"""Search options of a request (k, index, re-ranking, feedback), read from a form or JSON.

The same options as `cbir search`: -k, --index, --rerank, --shortlist,
--rotations (a form field; the JSON API's queries are ids, never turned),
--relevant, --not-relevant (and --allow-stale for the JSON API), --min-score,
and the filter --under, --label (each one value or several), --since, --until.
Each value is checked against the same specs as the CLI's (pipeline/specs.py;
the filter by `api.make_filter`); the web caps k lower, since every result is a
row to look up and, on a page, an image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import api, specs
from pipeline.config import Settings
from pipeline.errors import CbirError
from pipeline.web.failures import BadRequest

MAX_K = 1000
MAX_FEEDBACK = 1000  # marked ids per list: each is a stored vector read per search
JSON_KEYS = (
    "id", "k", "index", "rerank", "shortlist", "relevant", "not_relevant", "allow_stale",
    "min_score", "under", "label", "since", "until", "verify_n",
)  # fmt: skip


@dataclass(frozen=True)
class SearchParams:
    """What one request asks for; None = the server's settings."""

    k: int | None = None
    index: str | None = None
    rerank: str | None = None
    shortlist: int | None = None
    verify_n: int | None = None  # candidates `rerank` "verify" checks
    rotations: str | None = None
    relevant: tuple[int, ...] = ()
    not_relevant: tuple[int, ...] = ()
    allow_stale: bool = False
    min_score: float | None = None
    within: api.Filter = api.Filter()  # the filter, checked (`make_filter`)
    # The filter as the request wrote it, for the page's fields to send again.
    under: tuple[str, ...] = ()
    label: tuple[str, ...] = ()
    since: str = ""
    until: str = ""

    def settings(self, base: Settings) -> Settings:
        """`base` with this request's choices, checked together as the CLI checks them.

        Re-ranking fewer candidates than the results shown makes no sense: unless
        the request names a shortlist, it grows to k.
        """
        changes = {
            key: getattr(self, key)
            for key in ("k", "index", "rerank", "shortlist", "verify_n", "rotations", "min_score")
            if getattr(self, key) is not None
        }
        if not changes:
            return base
        merged = {
            "k": base.k,
            "index": base.index,
            "rerank": base.rerank,
            "shortlist": base.shortlist,
            "verify_n": base.verify_n,
            "rotations": base.rotations,
            "min_score": base.min_score,
        }
        merged.update(changes)
        if self.shortlist is None:
            merged["shortlist"] = max(merged["shortlist"], merged["k"])
        return base.replace(**specs.validate(merged))

    def feedback(self) -> dict[str, tuple[int, ...]]:
        return {"relevant": self.relevant, "not_relevant": self.not_relevant}


# An integer as a request sends it. Not str.isdigit(), which also takes "²" (and int()
# then fails: a 500), nor int() alone, which reads "٣" and "５" as 3 and 5.
_INTEGER = re.compile(r"[0-9]{1,20}")


def integer(value: Any) -> Any:
    """A string of ASCII digits (spaces around allowed) as its int; anything else as it is,
    for the caller's check to refuse in one line."""
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return value


def _k(value: Any) -> int:
    value = integer(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        raise BadRequest(f"k must be an integer from 1 to {MAX_K}")
    return value


def _index(value: Any) -> str:
    return specs.check("index", value)


def _rerank(value: Any) -> str:
    return "+".join(specs.parse_rerank(specs.check("rerank", value)))


# Each verified candidate is a file decoded outside the decode slots (~10 ms warm, up to
# ~0.1 s cold): a request may not ask a server for more than this many.
MAX_VERIFY_N = 200


def _verify_n(value: Any) -> int:
    n = specs.check("verify_n", integer(value))
    if n > MAX_VERIFY_N:
        raise BadRequest(f"verify_n must be at most {MAX_VERIFY_N} on a server")
    return n


def _shortlist(value: Any) -> int:
    return specs.check("shortlist", integer(value))


# A number as a request sends it, in ASCII (float() alone also reads other scripts' digits).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")


def _min_score(value: Any) -> float:
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    return specs.check("min_score", value)


def _filter(under: Any, label: Any, since: Any, until: Any) -> dict[str, Any]:
    """The filter fields of a request, checked: the `Filter` and its values as written."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{name} must be a date like 2024-05-01, as text")
    try:
        within = api.make_filter(under, label, since or None, until or None)
    except CbirError as e:
        raise BadRequest(str(e)) from None
    return {
        "within": within,
        "under": tuple(under) if isinstance(under, list | tuple) else (under,) if under else (),
        "label": tuple(label) if isinstance(label, list | tuple) else (label,) if label else (),
        "since": since or "",
        "until": until or "",
    }


def catalog_ids(name: str, values: list[Any], limit: int = MAX_FEEDBACK) -> tuple[int, ...]:
    """Catalog ids from a JSON list or form values (each may be 'a,b,c'), at most `limit`."""
    ids: list[int] = []
    for v in values:
        parts = v.replace(",", " ").split() if isinstance(v, str) else [v]
        for p in map(integer, parts):
            if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p <= specs.ID.hi:
                raise BadRequest(f"{name} must be a list of catalog ids")
            ids.append(p)
    if len(ids) > limit:
        raise BadRequest(f"{name} names more than {limit} ids")
    return tuple(dict.fromkeys(ids))  # once each, in the order marked


def _checked_feedback(relevant: tuple[int, ...], not_relevant: tuple[int, ...]) -> None:
    both = sorted(set(relevant) & set(not_relevant))
    if both:
        raise BadRequest(f"ids marked both relevant and not relevant: {both[:5]}")


def from_form(form: Mapping[str, Any]) -> SearchParams:
    """From a page's query string or form (a werkzeug MultiDict); empty fields are not given."""

    def given(key: str) -> str | None:
        value = form.get(key)
        return value if value not in (None, "") else None

    params = SearchParams(
        k=_k(given("k")) if given("k") is not None else None,
        index=_index(given("index")) if given("index") is not None else None,
        rerank=_rerank(form.get("rerank")) if form.get("rerank") is not None else None,
        shortlist=_shortlist(given("shortlist")) if given("shortlist") is not None else None,
        verify_n=_verify_n(given("verify_n")) if given("verify_n") is not None else None,
        rotations=specs.check("rotations", given("rotations"))
        if given("rotations") is not None
        else None,
        relevant=catalog_ids("relevant", form.getlist("relevant")),
        not_relevant=catalog_ids("not_relevant", form.getlist("not_relevant")),
        min_score=_min_score(given("min_score")) if given("min_score") is not None else None,
        **_filter(
            [v for v in form.getlist("under") if v],
            [v for v in form.getlist("label") if v],
            given("since"),
            given("until"),
        ),
    )
    _checked_feedback(params.relevant, params.not_relevant)
    return params


def from_json(body: Any) -> tuple[int, SearchParams]:
    """(catalog id, options) from a JSON body like {"id": 12, "k": 5, "relevant": [3]}."""
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be an object like {"id": 12}')
    unknown = sorted(str(key) for key in body if key not in JSON_KEYS)
    if unknown:
        raise BadRequest(f"unknown keys {unknown[:5]}: use {', '.join(JSON_KEYS)}")
    image_id = body.get("id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise BadRequest("id must be an integer catalog id")

    def listed(key: str) -> tuple[int, ...]:
        value = body.get(key, [])
        if not isinstance(value, list):
            raise BadRequest(f"{key} must be a list of catalog ids")
        return catalog_ids(key, value)

    allow_stale = body.get("allow_stale", False)
    if not isinstance(allow_stale, bool):
        raise BadRequest("allow_stale must be true or false")
    params = SearchParams(
        k=_k(body["k"]) if "k" in body else None,
        index=_index(body["index"]) if body.get("index") is not None else None,
        rerank=_rerank(body["rerank"]) if body.get("rerank") is not None else None,
        shortlist=_shortlist(body["shortlist"]) if "shortlist" in body else None,
        verify_n=_verify_n(body["verify_n"]) if "verify_n" in body else None,
        relevant=listed("relevant"),
        not_relevant=listed("not_relevant"),
        allow_stale=allow_stale,
        min_score=_min_score(body["min_score"]) if body.get("min_score") is not None else None,
        **_filter(body.get("under"), body.get("label"), body.get("since"), body.get("until")),
    )
    _checked_feedback(params.relevant, params.not_relevant)
    return image_id, params
