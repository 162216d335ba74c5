"""What the search forms show of a filter: the folder picker, the labels, the dates, the cut-off.

Every search form (the collection page's and the results page's "Search again")
includes `templates/search_options.html`, whose filter fields come from here: the
choices (the collection's fullest folders, `MAX_FOLDERS` of them, and its labels)
and the values of the request being answered, so that a filter, like k or the
index, stays as it was from one page to the next.
"""

from __future__ import annotations

from typing import Any

from pipeline.web.params import SearchParams
from pipeline.web.service import Service

MAX_FOLDERS = 200  # folders offered by the picker: a datalist, so any other can be typed


def fields(service: Service, chosen: SearchParams | None = None) -> dict[str, Any]:
    """Template values of the filter fields: `folders`, `search_labels` and `filt`."""
    chosen = chosen or SearchParams()
    labels = sorted({r["label"] for r in service.browse_rows() if r["label"] is not None})
    score = chosen.min_score
    return {
        "folders": service.session.image_folders(MAX_FOLDERS),
        "search_labels": labels,
        "filt": {
            "under": list(chosen.under),
            "label": list(chosen.label),
            "since": chosen.since,
            "until": chosen.until,
            "min_score": "" if score is None else f"{score:g}",
        },
    }
