"""bench.py runs end to end on tiny numbers (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import bench

HERE = Path(__file__).resolve().parent


def needs_redis() -> None:
    """Skip without redis-server; in CI (BACKCHAT_REQUIRE_REDIS=1) fail instead."""
    if shutil.which("redis-server") is None:
        if os.environ.get("BACKCHAT_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed, and BACKCHAT_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")


def test_bench_runs_end_to_end_and_reports_json():
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--sockets", "5", "--rates", "5", "--duration", "1",
         "--history", "0", "60", "--search", "60", "--rooms", "4", "--room-sockets", "2", "--room-rates", "3", "--floor",
         "--class-size", "4", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    (pair,) = report["fan_out"]
    for run in (pair["app"], pair["baseline"], pair["floor"]):
        assert run["expected"] == 25 and run["received"] == 25 and run["lost"] == 0
        assert run["cpu_us_per_frame"] >= 0 and run["handshakes_per_s"] > 0  # CPU ticks are 10 ms: may read 0
    (rooms,) = report["many_rooms"]["runs"]  # 4 rooms x 2 sockets, 3 msg/s each for 1 s
    for run in (rooms["app"], rooms["baseline"], rooms["floor"]):
        assert run["rooms"] == 4 and run["expected"] == 24 and run["received"] == 24 and run["lost"] == 0
    assert [row["messages"] for row in report["history"]] == [0, 60]
    assert all(row["room_page_ms"] > 0 and row["older_page_ms"] > 0 for row in report["history"])
    assert all(row["catch_up_ms"] > 0 and row["history_page_ms"] > 0 for row in report["history"])
    (search,) = report["search"]
    assert search["messages"] == 60 and all(search[name] > 0 for name in bench.SEARCHES)
    assert report["code"]["code"]["lost"] == 0 and report["code"]["code"]["received"] > 0
    shapes = report["class"]  # (a class of 4: the bot's posts, the slow webhook, a poll)
    for name in ("bot_socket", "bot_api", "webhook_off", "webhook_slow"):
        assert shapes[name]["expected"] > 0 and shapes[name]["lost"] == 0, name
    assert shapes["bot_api"]["expected"] == shapes["bot_socket"]["expected"]
    assert any("webhook calls" in note for note in shapes["webhook_slow"]["notes"])
    poll = shapes["poll"]
    assert poll["voters"] == 4 and poll["pages"] == 5 and poll["lost"] == 0 and poll["vote_p99_ms"] > 0


def test_bench_measures_the_redis_path_in_many_small_rooms():
    needs_redis()
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--sockets", "4", "--rates", "2", "--duration", "1", "--history",
         "--search", "--rooms", "3", "--room-sockets", "2", "--room-rates", "3", "--workers", "2", "--no-shapes",
         "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (rooms,) = json.loads(done.stdout)["many_rooms"]["runs"]
    scaled = rooms["app_redis"]  # 2 uvicorn workers and their redis-server, CPU of all three counted
    assert scaled["server"] == "app+redis" and scaled["rooms"] == 3
    assert scaled["expected"] == 18 and scaled["received"] == 18 and scaled["lost"] == 0


def test_the_floor_server_checks_the_session_and_commits_before_it_sends(tmp_path):
    """bench.py's floor stands for what the app's promises cost at the least: it must really
    read the session and store each message before the broadcast, or its figures mean nothing."""
    floor_db = tmp_path / "floor.db"
    origin = {"origin": "http://testserver"}
    with TestClient(bench.baseline_app(floor_db)) as client:
        # Refused at the handshake: no session cookie; the session, but from another site.
        for headers in (origin, {"origin": "http://evil.example", "cookie": bench.floor_cookie()}):
            with pytest.raises(WebSocketDisconnect), client.websocket_connect("/chat/room/", headers=headers):
                pass
        with client.websocket_connect("/chat/room/", headers={**origin, "cookie": bench.floor_cookie()}) as ws:
            ws.send_text("hello floor")
            assert ws.receive_text() == "hello floor"
            with sqlite3.connect(floor_db) as db:  # committed by the time it came back
                assert db.execute("SELECT user_id, text FROM messages").fetchall() == [(1, "hello floor")]


def test_bench_pins_rooms_to_workers_and_reports_each_workers_cpu():
    needs_redis()
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--sockets", "2", "--rates", "2", "--duration", "1", "--history",
         "--search", "--rooms", "4", "--room-sockets", "2", "--room-rates", "3", "--workers", "3", "--pinned",
         "--no-shapes", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (rooms,) = json.loads(done.stdout)["many_rooms"]["runs"]
    pinned = rooms["app_redis"]
    assert pinned["expected"] == pinned["received"] == 24 and pinned["lost"] == 0
    assert [(w["rooms"], w["messages"]) for w in pinned["per_worker"]] == [(2, 6), (2, 6), (0, 0)]  # the last: none
    assert "workers/1 process handshakes" in rooms["ratios"]  # (a CPU ratio is left out when a tick-rounded CPU reads 0)
    assert set(rooms["ratios"]) <= {f"{pair} {what}" for pair in ("app/loop", "app/floor", "workers/1 process")
                                    for what in ("cpu_us_per_message", "handshakes")}
