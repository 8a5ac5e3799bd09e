"""Hot reload on a live server: a swap under concurrent traffic drops nothing, the new version is
served after it, a bundle that fails to load leaves the old one serving."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest
from serve_helpers import live_server, make_settings
from test_serve_api import metric_value

ADMIN = {"Authorization": "Bearer reload-token-123"}


def bundle_version(path) -> str:
    return json.loads((path / "bundle.json").read_text())["version"]


@pytest.fixture(scope="module")
def served(shop_bundle, tmp_path_factory):
    """A copy of the shop bundle that tests may overwrite on disk."""
    path = tmp_path_factory.mktemp("reload") / "served"
    shutil.copytree(shop_bundle, path)
    return path


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    settings = make_settings(served, tmp_path_factory.mktemp("reload-data"), admin_token="reload-token-123")
    with live_server(settings) as live:
        yield live


def reload(url: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/reload", json=body, headers=ADMIN, timeout=120)


def test_reload_under_traffic_drops_nothing(server, shop_bundle, banking_head_bundle):
    old = server.runtime.model_version
    target = banking_head_bundle if old == bundle_version(shop_bundle) else shop_bundle
    new = bundle_version(target)
    assert new != old
    results: list[tuple[float, int, str | None]] = []  # (sent at, status, model version)

    async def traffic(client: httpx.AsyncClient, stop: asyncio.Event, worker: int) -> None:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            response = await client.post("/v1/chat", json={
                "session_id": f"traffic-{worker}-{i}", "message": f"where is my order #{40000 + i}"})
            version = response.json().get("model_version") if response.status_code == 200 else None
            results.append((sent, response.status_code, version))
            i += 1

    async def run() -> tuple[httpx.Response, float]:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            workers = [asyncio.create_task(traffic(client, stop, w)) for w in range(8)]
            await asyncio.sleep(0.5)
            response = await client.post("/v1/admin/reload", json={"model": str(target)}, headers=ADMIN, timeout=120)
            swapped_at = time.monotonic()
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
        return response, swapped_at

    response, swapped_at = asyncio.run(run())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == new and body["previous_version"] == old and body["model"] == str(target)
    assert body["seconds"] > 0
    statuses = [status for _, status, _ in results]
    assert statuses.count(200) == len(results), f"failed requests during the reload: {statuses}"
    versions = [version for _, _, version in results]
    assert old in versions and new in versions  # traffic ran on both sides of the swap
    after = [version for sent, _, version in results if sent > swapped_at]
    assert after and set(after) == {new}
    assert httpx.get(f"{server.url}/readyz").json()["model_version"] == new
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "supportbot_model_info", version=new) == 1.0
    assert f'version="{old}"' not in metrics
    assert metric_value(metrics, "supportbot_reloads_total", result="ok") >= 1


def test_a_bundle_that_fails_to_load_leaves_the_old_one_serving(server, shop_bundle, tmp_path):
    serving = server.runtime.model_version
    damaged = tmp_path / "damaged"
    shutil.copytree(shop_bundle, damaged)
    with open(damaged / "head.safetensors", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")

    refused = reload(server.url, {"model": str(damaged)})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "bundle_error"
    assert "head.safetensors is damaged" in error["message"] and f"still serving {serving}" in error["message"]

    missing = reload(server.url, {"model": str(tmp_path / "nowhere")})
    assert missing.status_code == 422 and "no model bundle at" in missing.json()["error"]["message"]

    chat = httpx.post(f"{server.url}/v1/chat", json={"message": "where is my order #48213"})
    assert chat.status_code == 200 and chat.json()["model_version"] == serving
    assert httpx.get(f"{server.url}/readyz").json() == {"ready": True, "status": "ready", "model_version": serving,
                                                        "detail": None}
    assert metric_value(httpx.get(f"{server.url}/metrics").text, "supportbot_reloads_total", result="failed") >= 2


def test_reload_without_a_path_rereads_the_served_bundle(server, served, banking_head_bundle, shop_bundle):
    reload(server.url, {"model": str(served)})  # serve the copy again, whatever the tests before did
    assert server.runtime.model_version == bundle_version(shop_bundle)
    shutil.rmtree(served)
    shutil.copytree(banking_head_bundle, served)  # a new model is deployed to the same folder

    response = reload(server.url)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == bundle_version(banking_head_bundle)
    assert response.json()["model"] == str(served)
    reply = httpx.post(f"{server.url}/v1/chat", json={"message": "my card has not arrived yet"}).json()
    assert reply["model_version"] == bundle_version(banking_head_bundle)


def test_one_reload_at_a_time(server, shop_bundle):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*[
                client.post("/v1/admin/reload", json={"model": str(shop_bundle)}, headers=ADMIN) for _ in range(2)
            ])

    responses = asyncio.run(run())  # whichever arrives second finds the first loading (it takes a while)
    assert sorted(r.status_code for r in responses) == [200, 409]
    refused = next(r for r in responses if r.status_code == 409)
    assert refused.json()["error"]["code"] == "reload_in_progress"
