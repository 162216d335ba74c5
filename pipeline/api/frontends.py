"""What the front-ends need from the core besides the API calls: option limits, parsers, texts.

The CLI and the web app may import only the API (setup.cfg, contract "front-ends"),
yet they check options while parsing them against limits the core defines (the
most shards, the whitening's ranges, a memory size, a search parameter) and show
results in the core's own words (an index update, a whitening, the model of a
catalog, an evaluation report). Each is named here from where it is defined, so
there is one copy of each and the front-ends need no import of the core.
"""

from __future__ import annotations

from typing import Any

from pipeline.embed.descriptor import from_fingerprint
from pipeline.evaluation.report import write_report
from pipeline.retrieval.autoindex import parse_size
from pipeline.retrieval.factories import parse_params
from pipeline.retrieval.growing import describe_update
from pipeline.retrieval.shards import MAX_SHARDS
from pipeline.retrieval.whitening import DEFAULT_DIM as DEFAULT_WHITEN_DIM
from pipeline.retrieval.whitening import DEFAULT_SHRINKAGE, SHRINKAGE_SPEC
from pipeline.retrieval.whitening import DIM_SPEC as WHITEN_DIM_SPEC
from pipeline.retrieval.whitening import describe as describe_whitening
from pipeline.retrieval.whitening import read_note as whitening_note

__all__ = [
    "DEFAULT_SHRINKAGE",
    "DEFAULT_WHITEN_DIM",
    "MAX_SHARDS",
    "SHRINKAGE_SPEC",
    "WHITEN_DIM_SPEC",
    "describe_model",
    "describe_update",
    "describe_whitening",
    "parse_params",
    "parse_size",
    "whitening_note",
    "write_report",
]


def describe_model(fingerprint: dict[str, Any]) -> str:
    """A catalog's model in one line: architecture, weights digest, and its descriptor
    (or, for a catalog written before descriptors were recorded, its pooling)."""
    d = from_fingerprint(fingerprint)
    return (
        f"{fingerprint['architecture']}, weights sha256 {fingerprint['weights_sha256'][:16]}; "
        + (d.describe_text() if d else f"{fingerprint.get('pooling')} pooling")
    )
