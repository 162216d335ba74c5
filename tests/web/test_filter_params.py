"""The web page's filter (folder picker, label, dates) and score cut-off, and the same on
the JSON API: answers as the Python API gives them, values carried from one page to the
next, hostile values a 400 in one line. Fast tier, fake model."""

from __future__ import annotations

import io
import json
import re
import sqlite3

import numpy as np
import pytest
from PIL import Image

import fakes

pytest.importorskip("flask")


def _with_fake_model(fn):
    import pipeline.api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        return fn()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import pipeline
    from pipeline import api
    from pipeline.web import server

    tmp = tmp_path_factory.mktemp("webfilters")
    fakes.make_images(tmp / "imgs" / "a", 16, seed=1)
    fakes.make_images(tmp / "imgs" / "b", 16, seed=2)
    options = {"catalog": str(tmp / "c.db"), "index_dir": str(tmp / "idx")}
    _with_fake_model(lambda: pipeline.index([tmp / "imgs"], **options))
    app = _with_fake_model(
        lambda: server.open_app(api.settings_for(**options), thumbs_dir=tmp / "thumbs")
    )
    return {"client": app.test_client(), "tmp": tmp, **options}


def paths(served) -> dict[int, tuple[str, str]]:
    con = sqlite3.connect(served["catalog"])
    out = {i: (p, lab) for i, p, lab in con.execute("select id, path, label from images")}
    con.close()
    return out


def error_line(r) -> str:
    assert r.status_code == 400, r.get_data(as_text=True)
    message = json.loads(r.get_data(as_text=True))["error"]
    assert message and "\n" not in message
    return message


def test_json_filter_answers_as_the_python_api(served):
    import pipeline

    folder = str(served["tmp"] / "imgs" / "b")
    body = {"id": 0, "k": 8, "under": folder, "label": ["red"], "since": "2000-01-01",
            "min_score": -0.5}  # fmt: skip
    r = served["client"].post("/api/search", json=body)
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    want = pipeline.search(0, catalog=served["catalog"], index_dir=served["index_dir"], k=8,
                           under=folder, label="red", since="2000-01-01", min_score=-0.5)[0]  # fmt: skip
    assert answer == want
    assert answer["filter"]["matching"] == 8 and len(answer["results"]) == 8
    rows = paths(served)
    assert all(rows[r["id"]][0].startswith(folder + "/") and rows[r["id"]][1] == "red"
               for r in answer["results"])  # fmt: skip


@pytest.mark.parametrize(
    "options, words",
    [
        ({"under": 5}, "under"),
        ({"under": ["ok", 5]}, "under"),
        ({"under": ""}, "under"),
        ({"label": {"a": 1}}, "label"),
        ({"label": ["x"] * 65}, "at most 64"),
        ({"since": 20240101}, "since"),
        ({"since": "2024-02-30"}, "since"),
        ({"until": "soon"}, "until"),
        ({"since": "2024-02-01", "until": "2024-01-01"}, "after until"),
        ({"min_score": "nan"}, "min_score"),
        ({"min_score": True}, "min_score"),
        ({"min_score": 1.01}, "min_score"),
        ({"min_score": "\u0660.\u0665"}, "min_score"),
    ],
)
def test_hostile_json_filters_are_400(served, options, words):
    r = served["client"].post("/api/search", json={"id": 0, **options})
    assert words in error_line(r)


@pytest.mark.parametrize(
    "query", ["since=2024-13-01", "until=x", "min_score=2", "min_score=inf", "under=a%00b",
              "since=2024-02-02&until=2024-02-01"],
)  # fmt: skip
def test_hostile_page_filters_are_400(served, query):
    r = served["client"].get(f"/image/0?{query}")
    assert r.status_code == 400 and 'id="error"' in r.get_data(as_text=True)


def test_the_page_offers_folders_and_dates_and_keeps_them(served):
    client, tmp = served["client"], served["tmp"]
    home = client.get("/").get_data(as_text=True)
    assert 'id="cbir-folders"' in home and 'type="date" name="since"' in home
    for folder in ("a/red", "a/blue", "b/red", "b/blue"):
        assert f'<option value="{tmp / "imgs" / folder}">8 images</option>' in home
    folder = tmp / "imgs" / "a"
    page = client.get(
        "/image/3", query_string={"under": str(folder), "label": "blue", "since": "2001-02-03",
                                  "until": "2100-01-01", "min_score": "0.1", "k": "5"},
    ).get_data(as_text=True)  # fmt: skip
    assert 'id="filter-summary"' in page and "(8 images match)" in page
    # The "Search again" form sends the same filter: the values stay in its fields.
    assert f'name="under" list="cbir-folders" size="24" placeholder="any" value="{folder}"' in page
    assert "<option selected>blue</option>" in page
    assert 'name="since" value="2001-02-03"' in page and 'name="until" value="2100-01-01"' in page
    assert 'name="min_score" min="-1" max="1" step="0.01" placeholder="-1" value="0.1"' in page
    ids = [int(i) for i in re.findall(r'class="mark-rel" name="relevant" value="(\d+)"', page)]
    rows = paths(served)
    assert 0 < len(ids) <= 5
    assert all(rows[i][0].startswith(f"{folder}/") and rows[i][1] == "blue" for i in ids)


def test_an_upload_search_is_filtered_and_carried(served):
    client, tmp = served["client"], served["tmp"]
    data = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(data, "JPEG")
    folder = str(tmp / "imgs" / "b")
    r = client.post("/search", data={"image": (io.BytesIO(data.getvalue()), "q.jpg"),
                                     "under": folder, "k": "4"})  # fmt: skip
    page = r.get_data(as_text=True)
    assert r.status_code == 200 and "(16 images match)" in page
    png = re.search(r'name="query_png" value="([^"]*)"', page).group(1)
    again = client.post("/search", data={"query_png": png, "query_name": "q.jpg",
                                         "under": folder, "k": "4"}).get_data(as_text=True)  # fmt: skip
    assert "(16 images match)" in again and f'value="{folder}"' in again
