""" "Why this match" in headless Chromium (issue 21): from a results page, the heat-map
switch lays a map over every thumbnail, "why?" opens the explanation of a result, whose
page shows the matches and toggles the heat map. Fake model, `cbir serve` as a process;
the screenshots go to $CBIR_TEST_ARTIFACTS (else a temp folder) to be looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_serve import browser, wait_for_images  # noqa: F401  (a fixture, and a helper)

import fakes

pytest.importorskip("flask")


@pytest.fixture
def live(tmp_path):
    from pipeline import api

    coll = tmp_path / "coll"
    fakes.make_images(coll / "imgs" / "other", 6, seed=9)  # all 8 in the top 10
    fakes.warped_pair(coll / "imgs", (480, 360))
    options = {"catalog": str(coll / "catalog.db"), "index_dir": str(coll / "index")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api.models, "cached_embedder", fakes.cached)
        api.index([str(coll / "imgs")], **options)
    with fakes.served(coll, tmp_path / "serve.log") as url:
        yield url, options


def _id_of(options: dict, name: str) -> int:
    import sqlite3

    con = sqlite3.connect(options["catalog"])
    (i,) = con.execute("select id from images where path like ?", [f"%/{name}"]).fetchone()
    con.close()
    return i


@pytest.mark.slow
def test_explain_in_the_browser(live, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, options = live
    artifacts = Path(os.environ.get("CBIR_TEST_ARTIFACTS", tmp_path / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    original, warped = _id_of(options, "original.png"), _id_of(options, "warped.png")
    browser.get(f"{url}/image/{original}")
    wait_for_images(browser, "#results img", n=8)
    browser.find_element(By.ID, "heat-overlays").click()
    WebDriverWait(browser, 30).until(
        lambda b: b.execute_script(
            "const h = document.querySelectorAll('#results img.heat');"
            "return h.length == 8 && Array.from(h).every(i => i.complete && i.naturalWidth > 0)"
        )
    )
    shown = browser.execute_script(
        "return getComputedStyle(document.querySelector('#results img.heat')).display"
    )
    assert shown == "block"
    # See-through: the thumbnail must show under its map (a grey card background hid it).
    behind = browser.execute_script(
        "return getComputedStyle(document.querySelector('#results img.heat')).backgroundColor"
    )
    assert behind in ("transparent", "rgba(0, 0, 0, 0)"), behind
    browser.save_screenshot(str(artifacts / "results-heat.png"))

    card = next(
        c
        for c in browser.find_elements(By.CSS_SELECTOR, "#results .result")
        if c.find_element(By.CLASS_NAME, "mark-rel").get_attribute("value") == str(warped)
    )
    card.find_element(By.CLASS_NAME, "why").click()
    assert "Why this match" in browser.find_element(By.TAG_NAME, "h2").text
    inliers = browser.find_element(By.ID, "inliers").text
    assert "verified" in inliers and int(inliers.split()[0]) > 7, inliers
    wait_for_images(browser, "#matches img, #plain-image", n=2)
    browser.save_screenshot(str(artifacts / "explain.png"))
    assert not browser.find_element(By.ID, "heat-image").is_displayed()
    browser.find_element(By.ID, "heat-toggle").click()
    assert browser.find_element(By.ID, "heat-image").is_displayed()
    assert not browser.find_element(By.ID, "plain-image").is_displayed()
    browser.save_screenshot(str(artifacts / "explain-heat.png"))
    print(f"screenshots in {artifacts}")
