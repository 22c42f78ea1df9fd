"""The web console (issue 23) in a real headless browser: Debian's Chromium driven
through chromedriver (selenium, with the driver's path given: nothing is downloaded).
Pages load with no console errors, the map shows the nodes `shoal dev` started, the
search box returns hits with the per-shard answers, the admin actions (an index build,
a drain and its undoing) act, a coordinator (a follower or the leader) serves the same
map, and a node killed here shows as down within the liveness timeout. Screenshots go
to $SHOAL_ARTIFACTS (default target/console-screenshots under the repository)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)) and not os.environ.get("CI"),
    reason="Debian's chromium and chromium-driver are not installed (scripts/test-python.sh installs them)",
)


@pytest.fixture
def browser(dev):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1600", "--ignore-certificate-errors"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def shots() -> pathlib.Path:
    p = pathlib.Path(os.environ.get("SHOAL_ARTIFACTS", pathlib.Path(__file__).resolve().parents[3] / "target" / "console-screenshots"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def wait_for(pred, timeout, what):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        v = pred()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_console_shows_the_cluster_a_node_going_down_and_searches(client, dev, browser):
    from selenium.webdriver.common.by import By

    name = "console-docs"
    client.create_collection(name, 384, model="all-MiniLM-L6-v2", replication_factor=1)
    client.ingest(name, [
        {"id": "w1", "text": "The boundary layer over a wing thickens toward the trailing edge."},
        {"id": "w2", "text": "A recipe for sourdough bread with a crisp crust."},
        {"id": "w3", "text": "Shock waves form on a wing at transonic speeds."},
    ])
    client.search(name, "wing", k=2)  # something for the charts
    key = pathlib.Path(f"{dev['data']}/keys/root.key").read_text().splitlines()[0].strip()
    d = browser
    d.get("https://127.0.0.1:7201/console#key=" + key)

    def rows(selector):
        # Read in one script: the tables are redrawn every poll, so elements found in
        # one call may be gone by the next.
        return d.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(r => [...r.cells].map(c => c.textContent))",
            selector,
        )

    def node_states():
        return {r[0]: r[2] for r in rows("#nodes tbody tr")}

    states = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(node_states()), 30, "two nodes listed")
    assert set(states.values()) == {"up"}, states
    text = lambda id: d.execute_script("return document.getElementById(arguments[0]).textContent", id)
    wait_for(lambda: name in text("collections"), 15, "the collection listed")
    wait_for(lambda: "leader" in text("coordinators"), 15, "the coordinator group's leader")
    assert not d.find_element(By.ID, "banner").is_displayed()
    d.save_screenshot(str(shots() / "console-cluster.png"))

    # The search box: hits with scores, and every shard's answer.
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "collection")).select_by_value(name)
    d.find_element(By.ID, "query").send_keys("aerodynamics of wings")
    d.find_element(By.CSS_SELECTOR, "#search button").click()
    hits = wait_for(lambda: rows("#hits tbody tr"), 15, "search hits")
    ids = [r[0] for r in hits]
    assert ids[0] in ("w1", "w3") and "w2" in ids, ids
    assert all(float(r[1]) > 0 for r in hits), hits
    answers = rows("#shard-answers tbody tr")
    assert len(answers) == 3 and all(r[1] == "yes" for r in answers), answers
    d.save_screenshot(str(shots() / "console-search.png"))
    assert severe(d) == [], severe(d)

    # An admin action (the root key is an admin's): an index build, its outcome shown and
    # the operation listed. The coordinator sizes the index from the documents the shards
    # have reported in their heartbeats, and refuses (FAILED_PRECONDITION) before the first
    # one; wait, as an operator would, until the shard table shows them.
    def reported_docs():
        return d.execute_script(
            """
            for (const div of document.querySelectorAll('#collections div.collection')) {
              if (!div.querySelector('h3').textContent.startsWith(arguments[0] + ' ')) continue;
              let n = 0;
              for (const r of div.querySelectorAll('tbody tr'))
                for (const rep of r.cells[4].textContent.split(' | ')) n += Number(rep.split(' ').pop()) || 0;
              return n;
            }
            return 0;
            """,
            name,
        )

    wait_for(lambda: reported_docs() >= 3, 30, "the shards' reports of the three documents")
    d.execute_script(
        "document.querySelector(`button.build[data-collection='${arguments[0]}']`).click()", name
    )
    outcome = wait_for(lambda: (lambda t: t if "operation" in t or "refused" in t else None)(text("action")), 30, "the build's outcome")
    assert "refused" not in outcome, outcome
    wait_for(lambda: any(r[1] == "build_index" and r[2] == name for r in rows("#operations tbody tr")), 15, "the build listed")

    # A node drained and the drain undone from the nodes table (the coordinators act on
    # the admin key the node forwards).
    d.execute_script("document.querySelector(`button.drain[data-node='node-1']`).click()")
    outcome = wait_for(lambda: (lambda t: t if "now" in t or "refused" in t else None)(text("action")), 30, "the drain's outcome")
    assert "refused" not in outcome, outcome
    wait_for(lambda: node_states().get("node-1") == "draining", 15, "node-1 shown draining")
    d.execute_script("document.querySelector(`button.drain[data-node='node-1']`).click()")
    wait_for(lambda: "undrain of node-1: node node-1 now" in text("action"), 30, "the undrain's outcome")
    wait_for(lambda: node_states().get("node-1") == "up", 15, "node-1 up again")
    assert severe(d) == [], severe(d)

    # A coordinator serves the console too: the map (with the replicas' reports), no
    # search box or node charts.
    d.get("https://127.0.0.1:7002/console#key=" + key)  # another origin: the key again
    wait_for(lambda: "coordinator 2" in text("where"), 15, "the console served by coordinator 2")
    wait_for(lambda: (lambda s: s if len(s) == 2 else None)(node_states()), 15, "two nodes listed by the coordinator")
    wait_for(lambda: reported_docs() >= 3, 15, "the shards' reports through the coordinator")
    assert not d.find_element(By.ID, "search-section").is_displayed()
    assert not d.find_element(By.ID, "banner").is_displayed()
    assert severe(d) == [], severe(d)
    d.save_screenshot(str(shots() / "console-coordinator.png"))
    d.get("https://127.0.0.1:7201/console")
    wait_for(lambda: "node node-1" in text("where"), 15, "back on node-1's console")

    # A node killed: the map shows it down within the liveness timeout.
    victim = subprocess.run(
        ["pgrep", "-f", "--", f"--data-dir {dev['data']}/node-2"], capture_output=True, text=True
    ).stdout.split()
    assert victim, "node-2's process"
    for pid in victim:
        os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: node_states().get("node-2") == "down", 90, "node-2 shown as down")
    d.save_screenshot(str(shots() / "console-node-down.png"))
    assert severe(d) == [], severe(d)
