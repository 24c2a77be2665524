"""The exported rating sheet in a real browser: headless Chromium through Selenium.

A rater opens sheet.html (file://), enters an id, clicks A or B on every item, downloads the
votes CSV with the sheet's own script; `rebm humaneval score` then turns those files into
Table 2. This checks the page's JavaScript (choices, progress, saved state, the CSV it
writes) end to end, which the HTML-only tests in test_humaneval.py cannot.

Needs chromium and chromedriver on PATH (Debian: `apt-get install -y chromium chromium-driver`);
without them the test is skipped. Selenium Manager is never used: the driver path is explicit.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.generation.humaneval import DECOY, GOLD
from stages.cli import app
from tests.test_humaneval import generations_parquet

INSTALL = "install them with `apt-get install -y chromium chromium-driver` (Debian) or put both on PATH"
# Words a sheet must escape and a browser must show back unchanged.
SPECIAL = ["<b>bold</b>", "A&B", '"quoted"', "O'Brien", "naïve", "日本語", "—", "&amp;", "a<b>c"]
WORDS = SPECIAL + [f"w{i}" for i in range(60)]
GOOD, BAD = "alice", "Mallory \"M\" O'Neil"  # the second id exercises the CSV quoting and the file name


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Headless Chromium whose downloads land in tmp_path/downloads; skipped if not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(f"chromium and chromedriver are needed for the browser test: {INSTALL}")
    pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e '.[dev]'")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not reach the network
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        try:  # older headless modes ignore the download prefs; this CDP call makes them stick
            driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        except WebDriverException:
            pass  # the prefs alone suffice for current Chromium
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def wait_for_file(path: Path, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and not list(path.parent.glob("*.crdownload")) and path.stat().st_size > 0:
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path.name} was not downloaded within {timeout:.0f} s: {sorted(path.parent.iterdir())}")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def good_choice(r: dict) -> str:
    """Pass every check; joint over base always; joint over gold on even windows, else gold."""
    if r["is_attention_check"] == "1":
        want = GOLD
    elif r["comparison"] == "joint vs base":
        want = "joint"
    else:
        want = "joint" if int(r["window_id"]) % 2 == 0 else "gold"
    return "A" if r["system_a"] == want else "B"


def bad_choice(r: dict) -> str:
    """The decoy on every check, the other side on every comparison: counted, it would flip Table 2."""
    if r["is_attention_check"] == "1":
        return "A" if r["system_a"] == DECOY else "B"
    return {"A": "B", "B": "A"}[good_choice(r)]


def rate(driver, rater: str, choices: dict[str, str]) -> Path:
    """Enter the rater id, click the chosen side of every item, download the votes CSV."""
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "rater")
    field.clear()
    field.send_keys(rater)
    for pid, side in choices.items():
        radio = driver.find_element(By.CSS_SELECTOR, f'input[name="{pid}"][value="{side}"]')
        label = radio.find_element(By.XPATH, "..")  # the label box, as a rater clicks it
        # scroll it to mid-screen as a reader would: at the top it sits under the sticky header
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", label)
        label.click()
        assert radio.is_selected(), f"{pid}: clicking side {side} did not select it"
    total = len(choices)
    assert driver.find_element(By.ID, "progress").text == f"{total} / {total} answered"
    driver.find_element(By.ID, "download").click()  # all answered: no confirm() dialog
    name = "votes-" + "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in rater) + ".csv"
    return wait_for_file(driver.downloads / name)


def test_rater_fills_in_the_sheet_and_the_votes_score(browser, in_tmp: Path) -> None:
    from selenium.webdriver.common.by import By

    runner = CliRunner()
    news = generations_parquet(in_tmp / "news.parquet", np.arange(5), seed=0, words=WORDS)
    fiction = generations_parquet(in_tmp / "fiction.parquet", np.arange(100, 105), seed=1, words=WORDS)
    result = runner.invoke(
        app, ["humaneval", "export", f"news={news}", f"fiction={fiction}", "--windows", "3", "--seed", "5",
              "--out", "he"],
    )
    assert result.exit_code == 0, result.output
    rows = read_csv(in_tmp / "he/pairs.csv")
    assert len(rows) == 16  # 2 datasets × 3 windows × 2 pairs = 12 comparisons + 4 checks

    browser.get((in_tmp / "he/sheet.html").resolve().as_uri())
    assert browser.find_element(By.ID, "progress").text == "0 / 16 answered"
    # The page shows every item, in the key's order, with exactly the key's (unescaped) texts.
    shown = browser.execute_script(
        """return Array.from(document.querySelectorAll(".item")).map(function(item){
             var labels = item.querySelectorAll("label.choice");
             return [item.id, item.querySelector(".prefix").textContent,
                     labels[0].lastChild.textContent, labels[1].lastChild.textContent];
           });"""
    )
    assert [s[0] for s in shown] == [r["pair_id"] for r in rows]
    for (_, prefix, text_a, text_b), r in zip(shown, rows, strict=True):
        assert (prefix, text_a.strip(), text_b.strip()) == (r["prefix"], r["text_a"].strip(), r["text_b"].strip())
    assert any(w in " ".join(map(" ".join, shown)) for w in ("<b>bold</b>", '"quoted"', "O'Brien", "日本語"))

    good = {r["pair_id"]: good_choice(r) for r in rows}
    good_csv = rate(browser, GOOD, good)
    assert read_csv(good_csv) == [{"rater_id": GOOD, "pair_id": pid, "choice": c} for pid, c in good.items()]

    # The sheet keeps a rater's answers in the browser: a reload restores the id and every choice.
    browser.refresh()
    assert browser.find_element(By.ID, "rater").get_attribute("value") == GOOD
    assert browser.find_element(By.ID, "progress").text == "16 / 16 answered"
    restored = browser.execute_script(
        "var v = {}; document.querySelectorAll('input[type=radio]:checked')"
        ".forEach(function(i){ v[i.name] = i.value; }); return v;"
    )
    assert restored == good

    bad = {r["pair_id"]: bad_choice(r) for r in rows}
    bad_csv = rate(browser, BAD, bad)
    assert {r["rater_id"] for r in read_csv(bad_csv)} == {BAD}

    result = runner.invoke(
        app, ["humaneval", "score", str(good_csv), str(bad_csv), "--pairs", "he/pairs.csv", "--json", "table2.json"]
    )
    assert result.exit_code == 0, result.output
    scored = json.loads((in_tmp / "table2.json").read_text(encoding="utf-8"))
    assert scored["raters"] == 2 and scored["raters_kept"] == 1
    assert scored["raters_failed_check"] == [BAD] and scored["raters_without_check"] == []
    assert scored["votes_used"] == 12  # alice's comparisons only

    table = {(r["dataset"], r["model_1"], r["model_2"]): r for r in scored["table"]}
    assert set(table) == {(d, "joint", m) for d in ("news", "fiction") for m in ("base", "gold")}
    evens = []
    for dataset in ("news", "fiction"):
        vs_base = table[dataset, "joint", "base"]
        assert (vs_base["items"], vs_base["items_preferred"], vs_base["items_tied"]) == (3, 3, 0)
        assert vs_base["rate"] == 1.0 and vs_base["p_value"] == 1 / 8
        assert (vs_base["votes"], vs_base["votes_preferred"]) == (3, 3)
        compared = [int(r["window_id"]) for r in rows if r["dataset"] == dataset and r["comparison"] == "joint vs gold"]
        even = sum(w % 2 == 0 for w in compared)
        vs_gold = table[dataset, "joint", "gold"]
        assert (vs_gold["items"], vs_gold["items_preferred"], vs_gold["items_tied"]) == (3, even, 0)
        assert vs_gold["rate"] == pytest.approx(even / 3)
        evens.append(even)
    assert any(0 < e < 3 for e in evens)  # a real mix of joint and gold wins in some row
    assert "| news | joint | base | 100.00% | 0.12 | 3 (0) | 3/3 (100.00%) |" in result.output
    assert "1 kept of 2 (1 failed an attention check, 0 answered none)" in result.output
