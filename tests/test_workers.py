"""`supportbot serve --workers 2` on either backend: two processes on one port, torch threads split,
one outbox shared (SQLite file or PostgreSQL) with every reply sent once, in order."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from mock_chatwoot import MockChatwoot, deliver, message_event
from replicas import Replica

QUESTIONS = ["what are your opening hours", "which payment methods do you accept", "do you ship abroad",
             "how long is the warranty"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_serve_one_port_and_share_one_outbox(backend, postgres, shop_bundle, tmp_path):
    with MockChatwoot("tok") as chatwoot:
        env = {"SUPPORTBOT_CHATWOOT_URL": chatwoot.url, "SUPPORTBOT_CHATWOOT_TOKEN": "tok",
               "SUPPORTBOT_WEB_PAGE": "false"}
        if backend == "postgresql":
            env["SUPPORTBOT_DATABASE_URL"] = postgres.create_database(f"workers_{backend}")
        replica = Replica(f"workers-{backend}", shop_bundle, tmp_path / "data", env, workers=2)
        replica.start()
        try:
            replica.wait_ready()
            in_a_row = 0  # one /readyz reaches one worker: every worker is warm after many answers in a row
            while in_a_row < 30:
                in_a_row = in_a_row + 1 if httpx.get(f"{replica.url}/readyz", timeout=10).status_code == 200 else 0
                time.sleep(0.05)
            assert replica.process is not None
            children = subprocess.run(["ps", "-ww", "--ppid", str(replica.process.pid), "-o", "args="], capture_output=True,
                                      text=True).stdout
            assert children.count("multiprocessing.spawn") == 2, children
            with httpx.Client(base_url=replica.url, timeout=30) as http:
                for i in range(12):
                    response = http.post("/v1/chat", json={"session_id": f"w{i % 3}", "message": QUESTIONS[i % 4]})
                    assert response.status_code == 200, response.text
                for i in range(24):  # 4 conversations, 6 messages each, in order
                    conversation = 700 + i % 4
                    answer = deliver(f"{replica.url}/v1/webhooks/chatwoot",
                                     message_event(QUESTIONS[i % 4], message_id=7000 + i, conversation_id=conversation),
                                     secret=None, delivery_id=f"wd-{i}")
                    assert answer.status_code == 200 and answer.json()["status"] == "accepted", answer.text
            assert chatwoot.wait_for(lambda: len(chatwoot.replies()) == 24, timeout=60), len(chatwoot.replies())
            for c in range(4):
                assert len(chatwoot.replies(1, 700 + c)) == 6
            log = replica.log_path.read_text(errors="replace")
            assert "2 worker processes" in log and "1 torch thread(s) each" in log
        finally:
            replica.stop()


def test_workers_whose_app_cannot_be_built_stop_the_server_instead_of_answering_healthy(shop_bundle, tmp_path):
    """The parent checks the bundle and the database; what only the app's build finds (here the session
    store's file is a folder) fails every worker. They must not stay up answering /healthz 200 and
    every other route 'starting' for ever: the server exits 1 and says why."""
    data = tmp_path / "data"
    (data / "sessions.sqlite3").mkdir(parents=True)
    replica = Replica("workers-broken", shop_bundle, data, {"SUPPORTBOT_WEB_PAGE": "false"}, workers=2)
    replica.start()
    try:
        assert replica.process is not None
        replica.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server kept running with workers that failed to start: {replica.tail()}")
    finally:
        replica.stop()
    assert replica.process.returncode == 1, replica.tail()
    log = replica.log_path.read_text(errors="replace")
    assert "the server failed to start" in log and "a worker process failed to start" in log, log[-2000:]
