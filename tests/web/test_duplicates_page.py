"""The review page of duplicates in `cbir serve`: /duplicates, /api/duplicates, the CSV
export, and the guard on moves (`--allow-moves DIR`, and a token).

Fast tier: a fake model (tests/fakes.py) over generated images with planted copies:
3 with the same bytes and 3 upscaled (near-identical, a higher resolution: the
keeper). The fake model's vectors of different images reach a cosine of about 0.995,
its copies 0.99999: at near=0.999 only the planted groups are found. The browser
test of the page is in test_serve.py (`test_browser_duplicates`, slow tier).
"""

from __future__ import annotations

import csv
import io
import shutil

import pytest
from PIL import Image
from test_serve import TOKEN, one_line_error, open_app

import fakes

pytest.importorskip("flask")

NEAR = "0.999"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """24 generated images, 3 copied byte for byte and 3 upscaled to 96x96."""
    import pipeline

    tmp = tmp_path_factory.mktemp("dups")
    made = fakes.make_images(tmp / "images", 24)
    for p in made[:3]:
        shutil.copy(p, p.with_name(f"same_{p.name}"))
    for p in made[3:6]:
        Image.open(p).resize((96, 96)).save(p.with_name(f"big_{p.name}"), quality=95)
    options = {"catalog": str(tmp / "cat.db"), "index_dir": str(tmp / "index")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        pipeline.index([tmp / "images"], **options)
    return {**options, "tmp": tmp}


def serve(collection: dict, **kwargs):
    options = {k: collection[k] for k in ("catalog", "index_dir")}
    return open_app(options, thumbs_dir=collection["tmp"] / "thumbs", **kwargs)


@pytest.fixture(scope="module")
def client(collection):
    return serve(collection).test_client()


def get(client, query: str = "", status: int = 200, headers: dict | None = None) -> dict:
    r = client.get(f"/api/duplicates?{query}", headers=headers)
    assert r.status_code == status, r.get_data(as_text=True)
    return r.get_json()


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ---- the JSON route -----------------------------------------------------------------------------


def test_groups_at_a_threshold(client):
    answer = get(client, f"near={NEAR}")
    assert answer["include"] == ["exact", "near"] and answer["thresholds"]["near"] == 0.999
    assert answer["images"] == 30 and answer["index"] == "exact" and answer["pair_recall"] is None
    assert (answer["total_groups"], answer["kinds"]) == (6, {"exact": 3, "near": 3})
    assert (answer["page"], answer["pages"], answer["per_page"]) == (1, 1, 20)
    for g in answer["groups"]:
        assert len(g["images"]) == 2 and sum(im["keeper"] for im in g["images"]) == 1
        keeper = next(im for im in g["images"] if im["keeper"])
        assert g["keeper"] == keeper["id"]
        for im in g["images"]:
            assert im["score"] >= 0.999 and im["width"] and im["size"] and im["exists"]
        if g["kind"] == "near":  # the upscaled copy: the higher resolution is kept
            assert keeper["path"].rsplit("/", 1)[1].startswith("big_") and keeper["width"] == 96
    extra = [im for g in answer["groups"] for im in g["images"] if not im["keeper"]]
    assert answer["to_move"] == {"images": 6, "bytes": sum(im["size"] for im in extra)}


def test_the_same_report_as_the_api(client, collection):
    import pipeline

    report = pipeline.api.duplicates_report(
        **{k: collection[k] for k in ("catalog", "index_dir")}, near=float(NEAR)
    )
    answer = get(client, f"near={NEAR}&per_page=200")
    assert answer["groups"] == report["groups"]
    assert {k: answer[k] for k in report if k != "groups"} == {
        k: v for k, v in report.items() if k != "groups"
    }


def test_a_lower_threshold_regroups(client):
    tight, loose = get(client, f"near={NEAR}"), get(client, "near=0.95&per_page=200")
    grouped = lambda a: {im["id"] for g in a["groups"] for im in g["images"]}  # noqa: E731
    assert grouped(tight) < grouped(loose) and loose["pairs"] > tight["pairs"]
    only_exact = get(client, "include=exact")
    assert only_exact["kinds"] == {"exact": 3} and only_exact["pairs"] == 0


def test_paging(client):
    everything = get(client, f"near={NEAR}&per_page=200")["groups"]
    seen = []
    for page in (1, 2, 3):
        answer = get(client, f"near={NEAR}&per_page=4&page={page}")
        assert (answer["page"], answer["pages"], answer["total_groups"]) == (min(page, 2), 2, 6)
        if page <= 2:
            seen += answer["groups"]
    assert len(seen) == 6 and seen == everything
    assert get(client, f"near={NEAR}&per_page=4&page=3")["groups"] == everything[4:]  # last page


@pytest.mark.parametrize(
    "query, words",
    [
        ("near=abc", "near must be a number"),
        ("near=2", "near must be"),
        ("near=0", "near must be"),
        ("near=%D9%A0.%D9%A9", "near must be a number"),  # Arabic-Indic digits: float() reads them
        ("similar=-0.5", "similar must be a number"),
        ("include=foo", "include must be one of exact, near, similar"),
        ("include=near,similar&near=0.8&similar=0.9", "must not be above"),
        ("page=0", "page must be an integer"),
        ("page=%C2%B2", "page must be an integer"),
        ("per_page=1000", "per_page must be an integer from 1 to 200"),
        ("index=nope", "no index named 'nope'"),
    ],
)
def test_bad_parameters(client, collection, query, words):
    r = client.get(f"/api/duplicates?{query}")
    assert r.status_code == 400
    assert words in one_line_error(r, collection["tmp"])


def test_bad_parameters_of_the_page(client):
    r = client.get("/duplicates?per_page=x")
    assert r.status_code == 400 and "per_page must be" in r.get_data(as_text=True)


# ---- the page -----------------------------------------------------------------------------------


def test_page_and_link(client):
    assert 'href="/duplicates"' in client.get("/").get_data(as_text=True)
    html = client.get(f"/duplicates?near={NEAR}&per_page=50").get_data(as_text=True)
    for part in ('id="near"', 'id="similar"', 'id="select-page"', 'id="select-none"',
                 'id="export"', 'action="/duplicates/export"', 'id="groups"'):  # fmt: skip
        assert part in html, part
    assert 'id="move"' not in html  # not started with --allow-moves
    # The options reach the script as JSON (not escaped twice by the page's finalize).
    assert '"near": 0.999' in html and '"per_page": 50' in html and "&#34;" not in html


# ---- the CSV export -----------------------------------------------------------------------------


def export(client, status: int = 200, **fields) -> str:
    r = client.post("/duplicates/export", data={"near": NEAR, **fields})
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    if status == 200:
        assert r.mimetype == "text/csv"
        assert r.headers["Content-Disposition"] == 'attachment; filename="duplicates-moves.csv"'
    return r.get_data(as_text=True)


def test_export_the_default_plan_and_changes(client, collection):
    from pipeline.api.dedup_export import CSV_COLUMNS

    answer = get(client, f"near={NEAR}")
    keepers = [g["keeper"] for g in answer["groups"]]
    others = [im["id"] for g in answer["groups"] for im in g["images"] if not im["keeper"]]
    default = rows(export(client))
    assert list(default[0]) == list(CSV_COLUMNS)
    assert [int(r["id"]) for r in default] == others and {r["keeper"] for r in default} == {"0"}
    # Keep one copy, move one keeper (another copy kept instead); ids in no group are ignored.
    changed = rows(export(client, keep=str(others[0]), move=f"{keepers[1]},{10**6}"))
    assert {int(r["id"]) for r in changed} == (set(others) - {others[0]}) | {keepers[1]}
    assert next(r for r in changed if int(r["id"]) == keepers[1])["keeper"] == "1"
    assert rows(export(client, keep=",".join(map(str, others)))) == []
    # Both ways at once is refused.
    assert "both to move and to keep" in export(client, 400, keep="5", move="5")


def test_export_is_the_cli_csv(client, collection):
    """Every image chosen: the rows of `cbir duplicates --csv`, written by the same writer."""
    answer = get(client, f"near={NEAR}")
    everything = export(client, move=",".join(str(g["keeper"]) for g in answer["groups"]))
    r = fakes.cli("duplicates", "--csv", "--near", NEAR, "--catalog", collection["catalog"],
                  "--index-dir", collection["index_dir"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout == everything


# ---- the session's cache: the slider does not search the pairs again ----------------------------


def test_pairs_are_kept_across_thresholds(collection, monkeypatch):
    import pipeline.api.dedup

    calls = []
    real = pipeline.api.dedup.pairs_in

    def counted(coll, ids, low, *args, **kwargs):
        calls.append(low)
        return real(coll, ids, low, *args, **kwargs)

    monkeypatch.setattr(pipeline.api.dedup, "pairs_in", counted)
    client = serve(collection).test_client()
    first = get(client, f"near={NEAR}")
    for near in ("0.9995", "0.99", "0.97", "0.95", NEAR):
        get(client, f"near={near}")
    assert calls == [0.95]  # 0.999 rounded down to a step of 0.05: all of these regroup
    assert get(client, f"near={NEAR}") == first
    get(client, "near=0.92&include=near")
    assert calls == [0.95, 0.9]  # below the kept pairs: searched again, once


# ---- moves: only with --allow-moves DIR, and a token --------------------------------------------


def test_moves_refused_without_allow_moves(collection, tmp_path):
    client = serve(collection, token=TOKEN).test_client()
    r = client.post("/api/duplicates/move", data={"near": NEAR})
    assert r.status_code == 401  # no token: refused before anything else
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/api/duplicates/move", data={"near": NEAR}, headers=bearer)
    assert r.status_code == 403 and "--allow-moves" in one_line_error(r)
    assert client.get("/api/duplicates", headers=bearer).status_code == 200
    assert client.get("/api/duplicates").status_code == 401
    assert client.post("/duplicates/export", data={}).status_code == 401  # the login page
    assert all(p.exists() for p in (collection["tmp"] / "images").rglob("*.jpg"))


def test_allow_moves_needs_a_token(collection, tmp_path):
    from pipeline.errors import CbirError
    from pipeline.web.server import required_token

    with pytest.raises(CbirError, match="--allow-moves needs a token"):
        required_token("127.0.0.1", None, False, allow_moves=True)
    assert required_token("127.0.0.1", TOKEN, False, allow_moves=True) == TOKEN
    with pytest.raises(ValueError, match="needs a token"):
        serve(collection, moves_to=tmp_path / "moved")
    r = fakes.cli("serve", "--allow-moves", tmp_path / "moved", "--catalog", collection["catalog"])
    assert r.exit_code == 2 and "--allow-moves needs a token" in r.output


def test_allow_moves_shows_the_move_button(collection, tmp_path):
    client = serve(collection, token=TOKEN, moves_to=tmp_path / "moved").test_client()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    html = client.get("/duplicates", headers=bearer).get_data(as_text=True)
    assert 'id="move"' in html and '"can_move": true' in html


def test_move_and_undo(tmp_path):
    """With --allow-moves DIR and the token: the page's choice is moved as `--apply PLAN`
    moves it, and `cbir duplicates --undo LOG` puts back the same bytes."""
    import pipeline

    coll = {"tmp": tmp_path}
    made = fakes.make_images(tmp_path / "images", 8)
    copies = [shutil.copy(p, p.with_name(f"same_{p.name}")) for p in made[:2]]
    coll |= {"catalog": str(tmp_path / "cat.db"), "index_dir": str(tmp_path / "index")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.api.models, "cached_embedder", fakes.cached)
        pipeline.index([tmp_path / "images"], **{k: coll[k] for k in ("catalog", "index_dir")})
    before = {p: p.read_bytes() for p in (tmp_path / "images").rglob("*.jpg")}
    moved_to = tmp_path.parent / f"{tmp_path.name}-moved"
    client = serve(coll, token=TOKEN, moves_to=moved_to).test_client()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    answer = get(client, f"near={NEAR}", headers=bearer)
    assert answer["kinds"] == {"exact": 2}
    keep = next(im["id"] for im in answer["groups"][0]["images"] if not im["keeper"])
    r = client.post("/api/duplicates/move", data={"near": NEAR, "keep": str(keep)}, headers=bearer)
    assert r.status_code == 200, r.get_data(as_text=True)
    done = r.get_json()
    assert (done["moved"], done["groups"]) == (1, 1) and "/" not in done["log"]
    gone = [p for p in before if not p.exists()]
    assert len(gone) == 1 and gone[0] in copies
    assert (moved_to / gone[0].relative_to(tmp_path / "images")).read_bytes() == before[gone[0]]
    assert get(client, f"near={NEAR}", headers=bearer)["kinds"] == {"exact": 1}  # regrouped
    r = client.post("/api/duplicates/move", data={"near": NEAR, "keep": "1,2,3,4,5,6,7,8,9,10"},
                    headers=bearer)  # fmt: skip
    assert r.status_code == 400 and "no image is chosen" in one_line_error(r)
    r = fakes.cli("duplicates", "--undo", moved_to / done["log"], "--catalog", coll["catalog"],
                  "--index-dir", coll["index_dir"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p: p.read_bytes() for p in (tmp_path / "images").rglob("*.jpg")} == before
