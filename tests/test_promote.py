"""Promotion through the admin API on the zero-setup backend (SQLite in the data folder), and the
start-up refusal of an unreachable database, in one line naming the host."""

from __future__ import annotations

import shutil
import subprocess
import sys

import httpx
from pg_cluster import free_port
from replicas import ROOT
from serve_helpers import live_server, make_settings

from bot.bundle import load

ADMIN = "promote-admin-token"


def test_admin_promote_swaps_the_model_and_refuses_a_damaged_bundle(shop_bundle, banking_head_bundle, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(banking_head_bundle, damaged)
    victim = next(p for p in sorted(damaged.iterdir()) if p.name != "bundle.json" and p.is_file())
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    with live_server(make_settings(shop_bundle, tmp_path / "data", admin_token=ADMIN)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        before = http.get("/healthz").json()["model_version"]
        assert http.post("/v1/admin/promote", json={"model": str(banking_head_bundle)}).status_code == 401
        auth = {"Authorization": f"Bearer {ADMIN}"}
        refused = http.post("/v1/admin/promote", json={"model": str(damaged)}, headers=auth)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "bundle_error"
        assert "damaged" in refused.json()["error"]["message"]
        assert http.get("/healthz").json()["model_version"] == before, "the fleet stays on its version"
        promoted = http.post("/v1/admin/promote", json={"model": str(banking_head_bundle)}, headers=auth)
        assert promoted.status_code == 200, promoted.text
        body = promoted.json()
        target = load(banking_head_bundle).version
        assert body["model_version"] == target and body["previous_version"] == before and body["generation"] == 1
        assert http.get("/healthz").json()["model_version"] == target
    # A restart in the same data folder serves the promoted model, not the configured one.
    with live_server(make_settings(shop_bundle, tmp_path / "data", admin_token=ADMIN)) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=30).json()["model_version"] == target


def test_serve_with_an_unreachable_database_exits_2_in_one_line_naming_the_host(shop_bundle, tmp_path):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "SUPPORTBOT_DATA_DIR": str(tmp_path),
           "SUPPORTBOT_DATABASE_URL": f"postgresql://bot:s3cret@127.0.0.1:{port}/supportbot"}
    done = subprocess.run([sys.executable, "-m", "supportbot.cli", "serve", "--model", str(shop_bundle),
                           "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "s3cret" not in done.stderr, done.stderr
