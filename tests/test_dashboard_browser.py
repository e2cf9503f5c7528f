"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium, against the API under
gunicorn and a real worker. Screenshots of each page go to ``$DASHBOARD_SCREENSHOTS`` (else the test's
temporary folder; not a TORCHYARD_ variable, which the settings would refuse as unknown).

Without Chromium these tests skip, except in CI (``CI`` set), where they fail: CI installs it (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import HttpService, wait_for, worker_settings
from specs import circles_spec, long_spec

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS_NAME = "<img src=x onerror=alert(1)>"
WAIT = 120  # seconds for a page to show what a test waits for (a job's run included, on a loaded machine)

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # the test extra installs it
    webdriver = None


def _no_browser() -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install -e '.[test]')"
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    return f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)" if missing else None


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The API under gunicorn over SQLite and the filesystem broker, and one worker."""
    from migrations.apply import upgrade

    settings = worker_settings(tmp_path_factory.mktemp("home"))
    upgrade(settings.database_url)
    service = HttpService(settings)
    try:
        service.start_worker()
        yield service
    finally:
        service.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads):
    """Headless Chromium with a fresh profile that reaches nothing but the test's servers."""
    why = _no_browser()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests must run in CI: {why}")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--window-size=1400,1000",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def console(browser):
    """The browser console's messages since the browser started (each read drains Chromium's buffer)."""
    seen: list[dict] = []

    def read() -> list[dict]:
        seen.extend(browser.get_log("browser"))
        return seen

    return read


@pytest.fixture
def dashboard(service, browser):
    """The browser signed in to the dashboard as the service's user, on the Jobs page."""
    browser.get(f"{service.api.url}/")
    browser.execute_script("window.sessionStorage.clear()")
    browser.refresh()
    key = service.headers["Authorization"].removeprefix("Bearer ")
    until(browser, lambda b: b.find_element(By.ID, "api-key")).send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=jobs] table.jobs"))
    assert browser.find_element(By.ID, "who-name").text == "alice"
    return browser


def until(browser, condition, timeout: float = WAIT):
    """WebDriverWait's until, riding out an element that a refresh replaced meanwhile."""
    return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def shoot(browser, folder: Path, name: str) -> None:
    """The page as far as it goes, at most a window's height (the body's box, clipped to the window)."""
    browser.find_element(By.TAG_NAME, "body").screenshot(str(folder / f"dashboard-{name}.png"))


def csp_violations(messages: list[dict]) -> list[str]:
    return [m["message"] for m in messages if "Content Security Policy" in m["message"]]


def submit_through_form(browser, spec: dict | str) -> None:
    summary = browser.find_element(By.CSS_SELECTOR, "#submit > summary")
    if browser.find_element(By.ID, "submit").get_attribute("open") is None:
        summary.click()
    text = browser.find_element(By.ID, "spec-text")
    text.clear()
    # The whole text at once (send_keys would type it key by key, and the textarea has no auto-indent).
    browser.execute_script("arguments[0].value = arguments[1]", text,
                           spec if isinstance(spec, str) else json.dumps(spec, indent=2))
    browser.find_element(By.ID, "submit-spec").click()


def live_spec() -> dict:
    """Circles in 10 epochs of about half a second each here (12,000 rows, batches of 10): the stream, not the
    page's first load, brings most of its epochs. The learning rate halves every 4 epochs."""
    spec = circles_spec("live-curves", epochs=10, lr=0.003, checkpoints=True)
    spec["data"]["params"].update(n_samples=12_000, noise=0.15)
    spec["training"]["batch_size"] = 10
    return {**spec, "scheduler": {"type": "StepLR", "step_size": 4, "gamma": 0.5}, "tags": ["demo"]}


def test_sign_in_refuses_a_wrong_key_and_keeps_the_right_one_in_this_tab_s_session_storage_only(
        service, browser, screenshots):
    browser.get(f"{service.api.url}/")
    browser.execute_script("window.sessionStorage.clear()")
    browser.refresh()
    field = until(browser, lambda b: b.find_element(By.ID, "api-key"))
    field.send_keys("ty_not-a-key")
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    refused = until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "#sign-in .problem"))
    assert "not valid" in refused.text
    shoot(browser, screenshots, "sign-in")
    key = service.headers["Authorization"].removeprefix("Bearer ")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button[type=submit]").click()
    until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=jobs]"))
    assert browser.execute_script("return window.sessionStorage.getItem('torchyard.apiKey')") == key
    assert browser.execute_script("return document.cookie") == ""
    assert browser.execute_script("return window.localStorage.length") == 0
    assert key not in browser.current_url
    browser.find_element(By.ID, "sign-out").click()
    until(browser, lambda b: b.find_element(By.ID, "api-key"))
    assert browser.execute_script("return window.sessionStorage.getItem('torchyard.apiKey')") is None


def test_a_job_submitted_through_the_form_draws_its_epochs_live_and_its_weights_download(
        dashboard, service, screenshots, downloads, console, tmp_path):
    browser = dashboard
    spec = live_spec()
    submit_through_form(browser, spec)
    until(browser, lambda b: "#/jobs/job_" in b.current_url)
    job_id = browser.current_url.rsplit("/", 1)[1]
    page = until(browser, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=jobs][data-status]"))
    browser.execute_script("window.__sameDocument = true")  # gone if anything reloads the page
    curves = browser.find_element(By.ID, "curves")
    first = int(curves.get_attribute("data-points"))
    assert page.get_attribute("data-status") in ("queued", "running")
    assert first <= spec["training"]["epochs"] - 3, "the job was nearly done before the page first drew it"
    until(browser, lambda b: int(curves.get_attribute("data-points")) >= first + 3)
    assert browser.execute_script("return window.__sameDocument") is True
    assert curves.find_elements(By.CSS_SELECTOR, "figure.chart canvas"), "no chart drawn"

    until(browser, lambda b: page.get_attribute("data-status") == "succeeded")
    until(browser, lambda b: curves.get_attribute("data-points") == "10")
    titles = [f.get_attribute("data-title") for f in curves.find_elements(By.CSS_SELECTOR, "figure.chart")]
    assert titles[0] == "Loss" and "accuracy" in titles and "Learning rate" in titles, titles
    layers = browser.find_elements(By.CSS_SELECTOR, "#network tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[1].text for row in layers] == ["Linear", "ReLU", "Linear"]
    until(browser, lambda b: [line.text for line in b.find_elements(By.CSS_SELECTOR, "#log-lines .log-text")][-1:]
          == ["succeeded after 10 epochs (completed)"])  # its last line, read as the job ended

    button = until(browser, lambda b: b.find_element(By.ID, "download-weights"))
    until(browser, lambda b: button.is_enabled())
    button.click()
    saved = downloads / f"{job_id}.safetensors"
    size = int(until(browser, lambda b: b.find_element(By.ID, "downloads").get_attribute("data-downloaded-bytes")))
    wait_for(lambda: saved.is_file() and saved.stat().st_size == size, WAIT, f"{saved} to be saved")
    served = service.http.download_weights(job_id, tmp_path / "served.safetensors")
    assert saved.read_bytes() == served.read_bytes()  # the file the API serves, byte for byte
    shoot(browser, screenshots, "job")
    assert csp_violations(console()) == []


def test_a_bad_spec_shows_its_field_errors_beside_the_text(dashboard, screenshots):
    spec = circles_spec("bad")
    spec["model"]["layers"][0] = {"type": "Linaer", "out_features": 16}
    spec["training"]["epochs"] = -1
    submit_through_form(dashboard, spec)
    errors = until(dashboard, lambda b: b.find_elements(By.CSS_SELECTOR, "#spec-errors .field-errors li"))
    paths = {item.find_element(By.TAG_NAME, "code").text for item in errors}
    assert {"model.layers[0].type", "training.epochs"} <= paths, paths
    assert "Linear" in dashboard.find_element(By.ID, "spec-errors").text  # the nearest allowed name
    assert "#/jobs/" not in dashboard.current_url  # nothing submitted: still on the form
    shoot(dashboard, screenshots, "bad-spec")


def test_two_jobs_found_by_their_tag_and_ticked_in_the_list_are_compared(dashboard, service, screenshots):
    scheduled = {**circles_spec("compare-lr-0.1", epochs=4, lr=0.1), "tags": ["lr-sweep", "lr=0.1", "scheduled"],
                 "scheduler": {"type": "StepLR", "step_size": 2, "gamma": 0.5}, "loss": {"type": "BCEWithLogitsLoss"}}
    plain = {**circles_spec("compare-lr-0.02", epochs=4, lr=0.02), "tags": ["lr-sweep", "lr=0.02"]}
    ids = [service.submit({**spec, "experiment": "circles"}) for spec in (scheduled, plain)]
    for job_id in ids:
        service.wait_status(job_id)
    until(dashboard, lambda b: b.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{ids[0]}'] .tag"))
    jobs_page = dashboard.find_element(By.CSS_SELECTOR, "section[data-page=jobs]")
    assert int(jobs_page.get_attribute("data-jobs")) > 2
    dashboard.find_element(By.ID, "tag-filter").send_keys("lr-sweep\n")
    until(dashboard, lambda b: jobs_page.get_attribute("data-jobs") == "2")
    assert "tag=lr-sweep" in dashboard.current_url  # a reload keeps the filter
    Select(dashboard.find_element(By.ID, "status-filter")).select_by_value("queued")
    until(dashboard, lambda b: jobs_page.get_attribute("data-jobs") == "0")
    assert dashboard.find_element(By.CSS_SELECTOR, "table.jobs td.empty").text == "No jobs match these filters."
    Select(dashboard.find_element(By.ID, "status-filter")).select_by_value("")
    until(dashboard, lambda b: jobs_page.get_attribute("data-jobs") == "2")
    for job_id in ids:
        until(dashboard, lambda b, j=job_id: b.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{j}'] input").click()
              or True)
    dashboard.find_element(By.XPATH, "//button[text()='Compare selected']").click()
    charts = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, ".compare-charts[data-jobs='2']"))
    loss = charts.find_element(By.CSS_SELECTOR, "figure.chart[data-title='loss']")
    assert loss.get_attribute("data-points") == "4"
    rows = dashboard.find_elements(By.CSS_SELECTOR, "#spec-differences tbody tr")
    fields = {row.find_element(By.TAG_NAME, "code").text: [td.text for td in row.find_elements(By.TAG_NAME, "td")[1:]]
              for row in rows}
    assert fields["optimizer.lr"] == ["0.1", "0.02"]
    assert set(fields) == {"name", "optimizer.lr", "tags[1]", "tags[2]", "scheduler", "loss"}
    # An object against null: each side's whole value, as JSON text; an item one side lacks: "(absent)".
    assert [json.loads(value) for value in fields["scheduler"]] == [scheduled["scheduler"], None]
    assert [json.loads(value) for value in fields["loss"]] == [{"type": "BCEWithLogitsLoss", "pos_weight": None}, None]
    assert fields["tags[2]"] == ['"scheduled"', "(absent)"]
    shoot(dashboard, screenshots, "compare")
    dashboard.get(f"{service.api.url}/#/compare?tag=lr-sweep")  # the same jobs, chosen by their tag
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, ".compare-charts[data-jobs='2']"))
    assert dashboard.find_elements(By.ID, "compare-note") == []  # every job with the tag is there
    dashboard.get(f"{service.api.url}/#/compare?tag=no-such-tag")
    hint = until(dashboard, lambda b: b.find_element(By.ID, "compare-hint"))
    assert hint.text == "No jobs carry the tag “no-such-tag”."


def test_compare_by_a_tag_on_more_jobs_than_it_shows_says_so_and_the_list_says_why_queued_jobs_wait(
        dashboard, service, screenshots):
    # GPU jobs, which this CPU worker never takes: they stay queued, saying why, and cost no training time.
    spec = {**circles_spec("waits-for-a-gpu", epochs=2), "tags": ["gpu-sweep"], "resources": {"device": "cuda"}}
    ids = [service.submit(spec) for _ in range(21)]
    try:
        dashboard.get(f"{service.api.url}/#/jobs?tag=gpu-sweep")
        reason = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR,
                                                           f"tr[data-job-id='{ids[0]}'] .pending-reason"))
        assert reason.text == "no live worker serves queue 'gpu' (jobs needing 1 GPU)"
        shoot(dashboard, screenshots, "jobs-queued")

        dashboard.get(f"{service.api.url}/#/compare?tag=gpu-sweep")
        until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, ".compare-charts[data-jobs='20']"))
        note = dashboard.find_element(By.ID, "compare-note").text
        assert note == "Showing the newest 20 of the 21 jobs tagged “gpu-sweep” (at most 20 at once)."
        shown = [row.get_attribute("data-job-id") for row in
                 dashboard.find_elements(By.CSS_SELECTOR, "#compared-jobs tbody tr")]
        assert len(shown) == 20 and set(shown) < set(ids)
        assert dashboard.find_elements(By.CSS_SELECTOR, "#compared-jobs .swatch.dashed")  # colours, then dashed
        shoot(dashboard, screenshots, "compare-many")
    finally:  # gone again, so that later pages and screenshots show the other tests' jobs
        for job_id in ids:
            service.http.cancel(job_id)
            service.wait_status(job_id)
            service.http.delete(job_id)


def test_a_running_job_s_checkpoints_log_and_compared_curves_follow_it_and_the_list_cancels_it(
        dashboard, service, screenshots):
    job_id = service.submit(long_spec(epochs=200, n_samples=20_000, batch_size=20, name="to-cancel"))
    row = f"tr[data-job-id='{job_id}']"
    # Running, an epoch or more done: the list refreshes itself.
    until(dashboard, lambda b: not b.find_element(By.CSS_SELECTOR, f"{row} .progress .count").text.startswith("0/"))
    assert dashboard.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "running"
    shoot(dashboard, screenshots, "jobs")

    # Its page lists its checkpoints as they are written, and its log's times as HH:MM:SS.
    dashboard.get(f"{service.api.url}/#/jobs/{job_id}")
    page = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=jobs][data-status]"))
    first = until(dashboard, lambda b: newest_checkpoint(b))
    until(dashboard, lambda b: newest_checkpoint(b) > first)
    assert page.get_attribute("data-status") == "running"
    times = [span.text for span in until(dashboard, lambda b: b.find_elements(By.CSS_SELECTOR, "#log-lines .log-time"))]
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", text) for text in times), times
    shoot(dashboard, screenshots, "job-running")

    # Compare reads a running job's new epochs on.
    dashboard.get(f"{service.api.url}/#/compare?ids={job_id}")
    loss = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, ".compare-charts .chart[data-title='loss']"))
    drawn = int(loss.get_attribute("data-points"))
    until(dashboard, lambda b: int(loss.get_attribute("data-points")) > drawn)

    dashboard.get(f"{service.api.url}/#/jobs")
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, f"{row} button.cancel").is_enabled())
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, f"{row} button.cancel").click() or True)
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "cancelled")
    assert service.wait_status(job_id)["status"] == "cancelled"


def newest_checkpoint(browser) -> int:
    """The latest epoch the job page's checkpoint list offers (0 while it offers none)."""
    labels = [button.text for button in browser.find_elements(By.CSS_SELECTOR, "#checkpoints button")]
    return max((int(label.removeprefix("epoch ")) for label in labels), default=0)


def test_the_workers_and_datasets_pages_and_an_upload_with_progress(dashboard, tmp_path, screenshots):
    dashboard.find_element(By.CSS_SELECTOR, "nav a[data-page=workers]").click()
    assert until(dashboard, lambda b: b.find_element(By.ID, "live-workers")).text == "1"
    queues = dashboard.find_elements(By.CSS_SELECTOR, "#queues tbody tr td")
    assert [cell.text for cell in queues[:2]] == ["cpu", "1"]
    assert dashboard.find_elements(By.ID, "worker-detail") == []  # hosts are for admins
    shoot(dashboard, screenshots, "workers")

    dashboard.find_element(By.CSS_SELECTOR, "nav a[data-page=datasets]").click()
    data = tmp_path / "points.csv"
    data.write_text("<b>x</b>,y,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(2000)))
    until(dashboard, lambda b: b.find_element(By.ID, "dataset-file")).send_keys(str(data))
    # Every text the upload's status line shows, in order.
    dashboard.execute_script("""
        const status = document.getElementById("upload-status");
        window.__uploadStatus = [];
        new MutationObserver(() => window.__uploadStatus.push(status.textContent))
          .observe(status, { childList: true, subtree: true, characterData: true });""")
    dashboard.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "#upload-form .count").text == "100%")
    until(dashboard, lambda b: b.find_element(By.ID, "upload-status").text.startswith("Stored points.csv"))
    said = dashboard.execute_script("return window.__uploadStatus")
    assert said[-2:] == ["Sent; checking the file…", said[-1]], said  # between the last byte and the answer
    row = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "tr[data-dataset-id]"))
    assert row.find_element(By.CSS_SELECTOR, "td.name").text.startswith("points.csv")
    row.find_element(By.XPATH, ".//button[text()='3 columns']").click()
    names = until(dashboard, lambda b: b.find_elements(By.CSS_SELECTOR, "tr.columns-row .tag"))
    assert [tag.text for tag in names] == ["<b>x</b>", "y", "label"]  # a column name is text, not markup
    shoot(dashboard, screenshots, "datasets")
    row.find_element(By.XPATH, ".//button[text()='Delete']").click()
    dashboard.switch_to.alert.accept()
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "table.datasets td.empty"))


def test_docs_show_the_openapi_document_in_swagger_ui_under_the_policy(service, browser, screenshots, console):
    browser.get(f"{service.api.url}/docs")
    operations = until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    assert "/api/v1/jobs/{job_id}/metrics" in {op.get_attribute("data-path") or op.text for op in operations}
    shoot(browser, screenshots, "docs")
    assert csp_violations(console()) == []


def test_a_job_named_with_markup_is_shown_as_text_and_runs_nothing(dashboard, service, console):
    job_id = service.submit({**circles_spec(XSS_NAME, epochs=2), "tags": ["<b>bold</b>"], "experiment": XSS_NAME})
    link = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}'] td.name a"))
    assert link.text == XSS_NAME
    chips = dashboard.find_elements(By.CSS_SELECTOR, f"tr[data-job-id='{job_id}'] .tag")
    assert [chip.text for chip in chips] == [XSS_NAME, "<b>bold</b>"]  # the experiment, then the tags
    assert dashboard.find_elements(By.CSS_SELECTOR, "table.jobs b") == []
    assert dashboard.find_elements(By.CSS_SELECTOR, "table.jobs img") == []
    link.click()
    heading = until(dashboard, lambda b: b.find_element(By.ID, "job-name"))
    until(dashboard, lambda b: XSS_NAME in heading.text)
    assert dashboard.find_elements(By.CSS_SELECTOR, "main img") == []
    with pytest.raises(NoAlertPresentException):
        dashboard.switch_to.alert.text  # noqa: B018 (reading it is the check)
    assert csp_violations(console()) == []


def test_a_sweep_submitted_on_the_sweeps_page_is_followed_to_its_end_with_its_trials_sortable_curves_and_scatters(
        dashboard, service, screenshots, console):
    base = circles_spec("sweep-trial", epochs=3)
    base["data"]["validation_split"] = 0.2
    request = {"name": "browser-search", "base": base, "method": "random", "trials": 3, "parallelism": 3,
               "space": {"optimizer.lr": {"log_uniform": [0.003, 0.3]},
                         "model.layers[1].type": {"choice": ["ReLU", "Tanh"]}},
               "metric": "val_accuracy", "scheduler": {"type": "asha", "min_epochs": 1, "max_epochs": 3}}
    dashboard.find_element(By.CSS_SELECTOR, "nav a[data-page=sweeps]").click()
    until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=sweeps] table.sweeps"))
    submit_through_form(dashboard, request)
    until(dashboard, lambda b: "#/sweeps/swp_" in b.current_url
          or b.find_elements(By.CSS_SELECTOR, "#spec-errors .problem"))
    assert "#/sweeps/swp_" in dashboard.current_url, dashboard.find_element(By.ID, "spec-errors").text
    sweep_id = dashboard.current_url.rsplit("/", 1)[1]
    page = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, "section[data-page=sweeps][data-status]"))
    until(dashboard, lambda b: page.get_attribute("data-status") == "succeeded")  # read on until it ended
    sweep, trials = service.http.sweep(sweep_id), service.http.sweep_trials(sweep_id)

    def shown() -> list[int]:
        rows = dashboard.find_elements(By.CSS_SELECTOR, "#trials tbody tr")
        return [int(row.get_attribute("data-trial")) for row in rows]

    by_value = [t["number"] for t in sorted(trials, key=lambda t: (-t["value"], t["number"]))]
    until(dashboard, lambda b: shown() == by_value)  # the metric's best first, at first
    states = {int(row.get_attribute("data-trial")): row.get_attribute("data-state")
              for row in dashboard.find_elements(By.CSS_SELECTOR, "#trials tbody tr")}
    assert states == {trial["number"]: trial["state"] for trial in trials}
    assert sorted(states.values()) == ["pruned", "pruned", "succeeded"]  # η = 3: one of three goes on to epoch 3
    dashboard.find_element(By.CSS_SELECTOR, "#trials button[data-sort=number]").click()
    until(dashboard, lambda b: shown() == sorted(by_value))
    dashboard.find_element(By.CSS_SELECTOR, "#trials button[data-sort=number]").click()
    until(dashboard, lambda b: shown() == sorted(by_value, reverse=True))
    dashboard.find_element(By.CSS_SELECTOR, "#trials button[data-sort=value]").click()
    until(dashboard, lambda b: shown() == by_value)
    dashboard.find_element(By.CSS_SELECTOR, "#trials button[data-sort=value]").click()  # worst first
    until(dashboard, lambda b: shown() == by_value[::-1])
    dashboard.find_element(By.CSS_SELECTOR, "#trials button[data-sort=value]").click()
    until(dashboard, lambda b: shown() == by_value)

    # One chart, a line a trial (3 epochs for the one promoted, 1 for the pruned two).
    curves = dashboard.find_element(By.ID, "sweep-curves")
    until(dashboard, lambda b: curves.get_attribute("data-lines") == "3")
    [chart] = curves.find_elements(By.CSS_SELECTOR, "figure.chart")
    assert (chart.get_attribute("data-title"), chart.get_attribute("data-points")) == ("val_accuracy", "3")
    assert chart.find_elements(By.TAG_NAME, "canvas"), "no curves drawn"
    # A scatter plot a parameter, a dot a trial: the learning rate on a log axis, the layer's types as categories.
    scatters = {figure.get_attribute("data-param"): figure
                for figure in dashboard.find_elements(By.CSS_SELECTOR, "#sweep-params figure.scatter")}
    assert set(scatters) == {"optimizer.lr", "model.layers[1].type"}
    scales = [scatters[path].get_attribute("data-scale") for path in ("optimizer.lr", "model.layers[1].type")]
    assert scales == ["log", "categories"]
    for figure in scatters.values():
        until(dashboard, lambda b, f=figure: f.get_attribute("data-points") == "3")
        assert figure.find_elements(By.TAG_NAME, "canvas"), "no dots drawn"
    best = dashboard.find_element(By.ID, "best-job")
    assert best.text == sweep["best"]["job_id"]
    shoot(dashboard, screenshots, "sweep")

    worst = next(trial for trial in trials if trial["number"] == by_value[-1])
    dashboard.find_element(By.CSS_SELECTOR, f"#trials tr[data-trial='{worst['number']}'] a").click()
    until(dashboard, lambda b: b.current_url.endswith(f"#/jobs/{worst['job_id']}"))  # a trial's link: its job's page
    until(dashboard, lambda b: b.find_element(By.ID, "job-name"))
    dashboard.find_element(By.CSS_SELECTOR, "nav a[data-page=sweeps]").click()
    line = until(dashboard, lambda b: b.find_element(By.CSS_SELECTOR, f"tr[data-sweep-id='{sweep_id}']"))
    assert line.get_attribute("data-status") == "succeeded" and "3/3" in line.text
    line.find_element(By.CSS_SELECTOR, "a").click()
    until(dashboard, lambda b: b.find_element(By.ID, "delete-sweep")).click()
    dashboard.switch_to.alert.accept()
    until(dashboard, lambda b: b.current_url.endswith("#/sweeps"))
    until(dashboard, lambda b: not b.find_elements(By.CSS_SELECTOR, f"tr[data-sweep-id='{sweep_id}']"))
    assert csp_violations(console()) == []
