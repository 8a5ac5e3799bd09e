"""Protections of the public API on a live server: API key, admin and metrics tokens, rate limit, CORS,
body and queue limits; and the settings loader (YAML under SUPPORTBOT_* env, secrets hidden)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from itertools import count

import httpx
import pytest
from serve_helpers import live_server, make_settings

from serve.ratelimit import RateLimiter
from serve.settings import SettingsError, load_settings
from supportbot.cli import main as cli_main

API_KEY = "test-key-7c1f0e9a"
ADMIN_TOKEN = "admin-token-55aa"
METRICS_TOKEN = "metrics-token-3b9d"
ORIGIN = "https://shop.example"
_clients = count(1)


def new_client() -> dict[str, str]:
    """Headers of a fresh client address (the server trusts X-Forwarded-For from loopback)."""
    return {"X-Forwarded-For": f"198.51.100.{next(_clients)}"}


@pytest.fixture(scope="module")
def server(shop_bundle, tmp_path_factory):
    settings = make_settings(
        shop_bundle, tmp_path_factory.mktemp("serve-protection"), api_key=API_KEY, admin_token=ADMIN_TOKEN,
        metrics_token=METRICS_TOKEN,
        rate_limit_per_minute=60, rate_limit_burst=5, cors_origins=[ORIGIN], max_queue=1, max_classify_texts=1,
        trusted_proxies=["127.0.0.1"],  # X-Forwarded-For from loopback names the client (new_client)
    )
    with live_server(settings) as live:
        yield live


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def chat(http: httpx.Client, headers: dict[str, str], message: str = "where is my order #48213") -> httpx.Response:
    return http.post("/v1/chat", json={"message": message}, headers={**new_client(), **headers})


# ---------------------------------------------------------------------------- API key


def test_the_api_key_is_required_when_set(http):
    missing = chat(http, {})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == {
        "code": "unauthorized", "message": "this API needs a key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"}
    wrong = chat(http, {"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "the API key is not valid"
    assert chat(http, {"X-API-Key": API_KEY[:-1]}).status_code == 401
    assert chat(http, {"Authorization": f"Basic {API_KEY}"}).status_code == 401


def test_either_header_carries_the_key(http):
    assert chat(http, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert chat(http, {"authorization": f"bearer {API_KEY}"}).status_code == 200
    reply = chat(http, {"X-API-Key": API_KEY})
    assert reply.status_code == 200
    session = reply.json()["session_id"]
    assert http.get(f"/v1/sessions/{session}", headers=new_client()).status_code == 401
    assert http.get(f"/v1/sessions/{session}", headers={**new_client(), "X-API-Key": API_KEY}).status_code == 200
    assert http.post("/v1/classify", json={"texts": ["hi"]}, headers=new_client()).status_code == 401
    assert http.post("/v1/classify", json={"texts": ["hi"]},
                     headers={**new_client(), "X-API-Key": API_KEY}).status_code == 200


def test_operations_routes_stay_open(http):
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):
        assert http.get(path, headers=new_client()).status_code == 200, path


def test_keys_never_reach_the_logs(http, caplog):
    with caplog.at_level(logging.DEBUG):
        chat(http, {"Authorization": f"Bearer {API_KEY}"})
        chat(http, {"X-API-Key": "wrong-" + API_KEY})
        http.post("/v1/admin/reload", headers={**new_client(), "Authorization": f"Bearer {ADMIN_TOKEN}x"})
        http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}x"})
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "supportbot.access" in {r.name for r in caplog.records}
    assert API_KEY not in logged and ADMIN_TOKEN not in logged and METRICS_TOKEN not in logged


# ---------------------------------------------------------------------------- metrics token


def test_metrics_needs_its_token_when_set(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {METRICS_TOKEN}x"},
                    {"Authorization": METRICS_TOKEN}, {"X-API-Key": METRICS_TOKEN},
                    {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        response = http.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == {
            "code": "unauthorized", "message": "send the metrics token as `Authorization: Bearer TOKEN`"}
    response = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    [counted] = [line for line in response.text.splitlines()
                 if line.startswith('supportbot_rejected_requests_total{reason="metrics_token"}')]
    assert float(counted.split()[-1]) >= 7
    assert "# TYPE supportbot_ready gauge" in response.text


def test_metrics_is_open_without_a_token_and_the_server_says_so(shop_bundle, tmp_path, caplog):
    from serve_helpers import asgi_client

    from serve.app import create_app

    async def run() -> httpx.Response:
        async with asgi_client(create_app(make_settings(shop_bundle, tmp_path))) as client:
            return await client.get("/metrics")

    with caplog.at_level(logging.INFO):
        response = asyncio.run(run())
    assert response.status_code == 200 and "supportbot_ready 1.0" in response.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "/metrics" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("SUPPORTBOT_METRICS_TOKEN is not set")


# ---------------------------------------------------------------------------- admin token


def test_reload_needs_the_admin_token(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
                    {"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": ADMIN_TOKEN}):
        response = http.post("/v1/admin/reload", headers={**new_client(), **headers})
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "unauthorized"


def test_reload_is_off_without_an_admin_token(shop_bundle, tmp_path):
    from serve_helpers import asgi_client

    from serve.app import create_app

    async def run():
        async with asgi_client(create_app(make_settings(shop_bundle, tmp_path)), start=False) as client:
            return await client.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})

    response = asyncio.run(run())
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_disabled"


# ---------------------------------------------------------------------------- rate limit


def test_rate_limit_per_client(http):
    client = new_client()
    statuses = [http.post("/v1/classify", json={"texts": ["hi"]}, headers=client).status_code for _ in range(5)]
    assert statuses == [401] * 5  # the burst (refused for want of a key, but counted)
    limited = http.post("/v1/classify", json={"texts": ["hi"]}, headers=client)
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "1"  # 60/minute: one token a second
    assert limited.json()["error"]["code"] == "rate_limited"
    assert "retry in 1 s" in limited.json()["error"]["message"]
    other = http.post("/v1/classify", json={"texts": ["hi"]}, headers=new_client())
    assert other.status_code == 401  # another client is not affected
    with_key = http.post("/v1/classify", json={"texts": ["hi"]}, headers={**client, "X-API-Key": API_KEY})
    assert with_key.status_code == 200  # the API key has a bucket of its own
    assert http.get("/healthz", headers=client).status_code == 200  # operations are not limited


@pytest.fixture()
def limited_server(tmp_path):
    """A server with small limits, on no model (refusals come before the model; nothing waits for one)."""

    def start(**overrides):
        settings = make_settings(
            tmp_path / "no-such-bundle", tmp_path / f"data-{len(servers)}", api_key=API_KEY,
            rate_limit_per_minute=60, rate_limit_burst=3, api_key_rate_limit_per_minute=60,
            api_key_rate_limit_burst=10, webhook_rate_limit_per_minute=60, webhook_rate_limit_burst=4,
            **overrides,
        )
        context = live_server(settings, wait_ready=False)
        servers.append(context)
        return context.__enter__()

    servers: list = []
    yield start
    for context in servers:
        context.__exit__(None, None, None)


def test_an_api_key_has_a_limit_of_its_own_not_its_address(limited_server):
    with httpx.Client(base_url=limited_server().url, timeout=30) as http:
        keyed = [http.post("/v1/classify", json={"texts": ["hi"]}, headers={"X-API-Key": API_KEY}) for _ in range(11)]
        assert [r.status_code for r in keyed[:10]].count(429) == 0  # far past the address's burst of 3
        assert keyed[10].status_code == 429 and "with this API key" in keyed[10].json()["error"]["message"]
        anonymous = [http.post("/v1/classify", json={"texts": ["hi"]}).status_code for _ in range(4)]
        assert anonymous == [401, 401, 401, 429]  # the address has its own bucket, untouched by the key


def test_x_forwarded_for_is_trusted_only_from_configured_proxies(limited_server):
    def statuses(url: str) -> list[int]:
        with httpx.Client(base_url=url, timeout=30) as http:
            return [http.post("/v1/chat", json={"message": "hi"}, headers=new_client()).status_code for _ in range(6)]

    assert statuses(limited_server().url) == [401, 401, 401, 429, 429, 429]  # a spoofed address gets no fresh bucket
    assert statuses(limited_server(trusted_proxies=["127.0.0.1"]).url) == [401] * 6  # behind a trusted proxy


def test_the_rate_limit_applies_before_the_body_is_read(limited_server):
    live = limited_server()
    with httpx.Client(base_url=live.url, timeout=30) as http:
        assert [http.post("/v1/chat", json={"message": "hi"}).status_code for _ in range(3)] == [401] * 3
    with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
        # Headers announcing a large body, and no body: the answer cannot wait for it.
        sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500000\r\n\r\n")
        answer = b""
        while b'"rate_limited"' not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 429 ") and b'"rate_limited"' in answer


def test_webhooks_have_a_limit_of_their_own(limited_server):
    with httpx.Client(base_url=limited_server().url, timeout=30) as http:
        assert [http.post("/v1/chat", json={"message": "hi"}).status_code for _ in range(4)][-1] == 429
        json_body = {"headers": {"Content-Type": "application/json"}, "content": b"{}"}
        deliveries = [http.post("/v1/webhooks/generic", **json_body) for _ in range(5)]
        assert [r.status_code for r in deliveries[:4]] == [503] * 4  # not limited by the chat bucket
        assert deliveries[4].status_code == 429 and "to this webhook" in deliveries[4].json()["error"]["message"]
        assert http.post("/v1/webhooks/chatwoot", **json_body).status_code != 429  # each webhook has its bucket


def test_rate_limiter_refills_and_forgets():
    now = [0.0]
    limiter = RateLimiter(per_minute=30, burst=2, max_clients=2, clock=lambda: now[0])
    assert [limiter.check("a"), limiter.check("a")] == [0.0, 0.0]
    assert limiter.check("a") == pytest.approx(2.0)  # 30/minute: a token every 2 s
    now[0] = 1.0
    assert limiter.check("a") == pytest.approx(1.0)
    now[0] = 2.0
    assert limiter.check("a") == 0.0
    limiter.check("b"), limiter.check("c")  # "a" is forgotten beyond max_clients
    assert limiter.check("a") == 0.0 and limiter.check("a") == 0.0
    assert RateLimiter.retry_after_header(0.2) == "1" and RateLimiter.retry_after_header(2.01) == "3"
    assert RateLimiter(per_minute=0, burst=1).check("x") == 0.0  # 0: off


# ---------------------------------------------------------------------------- CORS, sizes, overload


def test_cors_allows_only_configured_origins(http):
    allowed = http.get("/healthz", headers={"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in http.get("/healthz", headers={"Origin": "https://evil.example"}).headers
    preflight = http.options("/v1/chat", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = http.options("/v1/chat", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 400


def test_size_limits_come_before_the_key(http):
    huge = http.post("/v1/chat", content=b"x" * 2_000_000, headers=new_client())
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "payload_too_large"
    long = chat(http, {"X-API-Key": API_KEY}, message="y" * 5000)
    assert long.status_code == 422 and long.json()["error"]["code"] == "message_too_long"


def test_a_full_queue_answers_503_and_keeps_serving(server):
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[
                client.post("/v1/chat", json={"message": f"refund for order #{50000 + i}"},
                            headers={**new_client(), "X-API-Key": API_KEY})
                for i in range(40)
            ])

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.json()["error"]["code"] == "overloaded" and busy.headers["retry-after"] == "1"
    assert chat(httpx.Client(base_url=server.url), {"X-API-Key": API_KEY}).status_code == 200


# ---------------------------------------------------------------------------- settings


def test_settings_precedence_and_secrets(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nbatch_max_size: 8\nrate_limit_burst: 3\ncors_origins: [https://a.example]\n"
                      "admin_token: from-yaml\n")
    monkeypatch.setenv("SUPPORTBOT_PORT", "9002")
    monkeypatch.setenv("SUPPORTBOT_API_KEY", "from-env-secret")
    monkeypatch.setenv("SUPPORTBOT_CORS_ORIGINS", "https://b.example, https://c.example")
    settings = load_settings(config, host=None, port=None)
    assert settings.port == 9002  # env over YAML
    assert settings.batch_max_size == 8 and settings.rate_limit_burst == 3  # YAML over defaults
    assert settings.cors_origins == ["https://b.example", "https://c.example"]
    assert settings.max_message_chars == 2000  # default
    assert load_settings(config, port=9003).port == 9003  # overrides over env
    assert settings.api_key.get_secret_value() == "from-env-secret"
    assert settings.admin_token.get_secret_value() == "from-yaml"
    assert "from-env-secret" not in repr(settings) and "from-env-secret" not in settings.model_dump_json()
    assert settings.data_dir == type(settings.data_dir)(os.environ["SUPPORTBOT_DATA_DIR"])


def test_callback_hosts_and_metrics_token_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPPORTBOT_CALLBACK_HOSTS", "Hooks.Example.com, .example.org,[::1], 127.0.0.1.")
    monkeypatch.setenv("SUPPORTBOT_METRICS_TOKEN", "from-env-metrics-secret")
    settings = load_settings(None)
    assert settings.callback_hosts == ["hooks.example.com", ".example.org", "::1", "127.0.0.1"]
    assert settings.metrics_token.get_secret_value() == "from-env-metrics-secret"
    assert "from-env-metrics-secret" not in repr(settings)
    assert "from-env-metrics-secret" not in settings.model_dump_json()
    monkeypatch.setenv("SUPPORTBOT_METRICS_TOKEN", "  ")
    assert load_settings(None).metrics_token is None  # blank is unset, not "nobody gets in"
    monkeypatch.delenv("SUPPORTBOT_CALLBACK_HOSTS")
    assert load_settings(None).callback_hosts == []
    for bad in ("https://hooks.example.com", "hooks.example.com:8443", "hooks.example.com/cb", ".10.0.0.1", "a b"):
        monkeypatch.setenv("SUPPORTBOT_CALLBACK_HOSTS", bad)
        with pytest.raises(SettingsError, match="callback_hosts: ") as error:
            load_settings(None)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("content,message", [
    ("port: [1, 2\n", r"serve\.yaml: line \d+: not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("prot: 8000\n", "prot: unknown setting"),
    ("port: eighty\n", "port: Input should be a valid integer"),
    ("batch_max_size: 0\n", "batch_max_size: Input should be greater than or equal to 1"),
    ("max_queue: 100\n", r"max_queue \(100\) must be at least max_classify_texts \(256\)"),
])
def test_bad_settings_files_get_one_clear_line(tmp_path, content, message):
    config = tmp_path / "serve.yaml"
    config.write_text(content)
    with pytest.raises(SettingsError, match=message) as error:
        load_settings(config)
    assert "\n" not in str(error.value) and str(config) in str(error.value)


@pytest.mark.parametrize("under", ["", "/sessions"])
@pytest.mark.parametrize("command", [["promote", "{tmp}/bundle"], ["review", "--model", "{tmp}/bundle"]])
def test_a_data_dir_that_is_a_file_is_one_line_for_every_command(tmp_path, capsys, monkeypatch, command, under):
    monkeypatch.delenv("SUPPORTBOT_DATA_DIR")  # the environment would win over the file
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "bundle.json").write_text("{}")
    plain = tmp_path / "data"
    plain.write_text("not a folder")
    config = tmp_path / "serve.yaml"
    config.write_text(f"data_dir: {plain}{under}\n")
    assert cli_main([*(a.format(tmp=tmp_path) for a in command), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"supportbot {command[0]}: error: invalid settings (settings file {config} or SUPPORTBOT_* "
                                f"environment): data_dir: Value error, {plain} exists and is not a folder"]


def test_supportbot_serve_refuses_bad_settings_and_bundles(tmp_path, shop_bundle, capsys):
    config = tmp_path / "serve.yaml"
    config.write_text("port: -1\n")
    assert cli_main(["serve", "--model", str(shop_bundle), "--config", str(config)]) == 2
    assert "port: Input should be greater than or equal to 0" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(shop_bundle), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2  # not a bundle: refused before serving
    assert "bundle.json is missing" in capsys.readouterr().err
