"""The dashboard in a real headless Chromium over a real run: Mosquitto, a collector, a simulated
PEARL device process and a device of another family (empty vectors, null entropy); live points;
a clear 404; the token when bound beyond loopback.

Screenshots go to ``$EDGEADAPT_SCREENSHOTS`` (the README's come from ``docs/img``) when set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from dashboard_fixtures import Dashboard, OtherFamilyDevice
from mqtt_fixtures import SimDevice, received, wait_for

from devices.telemetry.collector import Collector
from devices.telemetry.collector_db import CollectorStore
from devices.telemetry.mosquitto import Mosquitto
from runtime.cli import main as cli_main

TOKEN = "t0ken-for-the-test-0123456789"


def _attr(driver: Any, css: str, name: str) -> str:
    value = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) "
        ": null;",
        css,
        name,
    )
    return value or ""


def _screenshot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("EDGEADAPT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def test_fleet_and_device_pages_live_in_a_real_browser(
    broker: Mosquitto, collector: Collector, tmp_path: Path, browser: Any
) -> None:
    db = collector.db_path
    pearl = SimDevice(broker.url, "rover-1", tmp_path / "o1.sqlite", records=100_000, rate=40,
                      event_every=150)  # fmt: skip
    other = OtherFamilyDevice(broker.port, "arm-rl2")
    dash = None
    try:
        wait_for(lambda: received(db, "rover-1") > 20 and received(db, "arm-rl2") > 5, 20,
                 "records of both devices")  # fmt: skip
        dash = Dashboard(db)
        d = browser

        d.get(dash.base + "/")
        wait_for(lambda: _attr(d, "tr[data-device='arm-rl2']", "data-online") == "true", 15,
                 "both devices listed online on the fleet page")  # fmt: skip
        rows = {r.get_attribute("data-device"): r.text for r in
                d.find_elements("css selector", "#fleet tbody tr")}  # fmt: skip
        assert set(rows) == {"rover-1", "arm-rl2"}
        assert "online" in rows["rover-1"] and "pearl" in rows["rover-1"]
        assert "rl2" in rows["arm-rl2"] and "rl2-nav @ 3" in rows["arm-rl2"]
        assert "simulated" in rows["rover-1"]  # the profile from its birth
        time.sleep(1.0)  # let 'records' counters tick for the screenshot
        _screenshot(d, tmp_path, "dashboard-fleet.png")

        d.get(dash.base + "/device/rover-1")
        chart = "#chart-summary"
        wait_for(lambda: int(_attr(d, chart, "data-points") or 0) > 10, 15, "the first points")
        assert d.find_element("css selector", "#summary-title").text.startswith("belief mean")
        assert d.find_elements("css selector", "#chart-summary canvas"), "uPlot drew a canvas"
        first = int(_attr(d, chart, "data-last-seq"))
        first_t = float(_attr(d, chart, "data-last-t"))
        wait_for(lambda: int(_attr(d, chart, "data-last-seq")) > first + 10, 10,
                 "the chart's last point to move while records arrive")  # fmt: skip
        assert float(_attr(d, chart, "data-last-t")) > first_t
        wait_for(lambda: d.find_elements("css selector", "#events tbody tr"), 10, "events")
        assert "task_change" in d.find_element("css selector", "#events").text
        _screenshot(d, tmp_path, "dashboard-device.png")

        d.get(dash.base + "/device/arm-rl2")
        wait_for(lambda: int(_attr(d, "#chart-ood", "data-points") or 0) > 3, 15, "rl2 points")
        assert d.find_element("css selector", "#summary-title").text == "adaptation state (rl2)"
        assert "reports no adaptation state vector" in d.find_element(
            "css selector", "#chart-summary").text  # fmt: skip
        legend = d.find_element("css selector", "#chart-ood").text
        assert "warn 1.5" in legend and "alarm 2.5" in legend
        _screenshot(d, tmp_path, "dashboard-device-rl2.png")

        d.get(dash.base + "/device/no-such-device")
        assert "404: unknown device no-such-device" in d.find_element("id", "not-found").text
        status, body, _ = dash.get("/device/no-such-device")
        assert status == 404 and "unknown device" in body
        status, body, _ = dash.get("/api/device/no-such-device")
        assert status == 404 and json.loads(body)["error"] == "unknown device 'no-such-device'"
    finally:
        other.close()
        pearl.close()
        if dash is not None:
            dash.close()


def test_beyond_loopback_every_request_needs_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "c.sqlite"
    CollectorStore.open(db).close()
    args = ["dashboard", "--db", str(db), "--host", "0.0.0.0", "--port", "1"]
    assert cli_main(args) == 2
    assert "not loopback) needs a token" in capsys.readouterr().err
    assert cli_main([*args, "--token", "short"]) == 2
    assert "16-256 characters" in capsys.readouterr().err

    dash = Dashboard(db, "--token", TOKEN, host="0.0.0.0")
    try:
        for path in ("/", "/api/fleet", "/static/dashboard.css", "/live/fleet"):
            assert dash.get(path)[0] == 401, path
        assert dash.get("/api/fleet", {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        status, body, _ = dash.get("/api/fleet", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["devices"] == []
        status, _, headers = dash.get(f"/?token={TOKEN}")
        assert status == 200 and f"edgeadapt_token={TOKEN}" in headers["set-cookie"]
        assert dash.get("/api/fleet", {"Cookie": f"edgeadapt_token={TOKEN}"})[0] == 200
    finally:
        dash.close()


def test_dashboard_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dashboard", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "no collector database" in capsys.readouterr().err
