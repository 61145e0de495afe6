"""Hostile input on every endpoint: each malformed request gets a 4xx in OpenAI's error shape, never a 500
or a hang, and the app keeps serving correctly afterwards.

Cases come from schemathesis (negative generation from the app's own OpenAPI spec) plus hand-written ones
aimed at what schema fuzzing cannot know: path traversal, oversized bodies, hostile archives, limits in
tokens, auth.
"""

from __future__ import annotations

import io
import json
import socket
import zipfile

import httpx
import pytest
from conftest import MAX_PENDING_PER_ADAPTER, TENANT_KEYS

pytestmark = pytest.mark.slow

BASE = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EXAMPLES_PER_OPERATION = 14
MIN_DISTINCT_CASES = 150


def reference_answer(app) -> str:
    reply = app.openai().chat.completions.create(model=BASE, messages=QUESTION, max_tokens=12, temperature=0)
    return reply.choices[0].message.content


def assert_openai_error(response: httpx.Response, case: str) -> None:
    assert 400 <= response.status_code < 500, f"{case}: {response.status_code} {response.text[:300]}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssertionError(f"{case}: not an OpenAI-style error body: {response.text[:300]}") from exc
    assert isinstance(error.get("message"), str) and error["message"], case
    assert isinstance(error.get("type"), str) and error["type"].endswith("_error"), case


def schema_cases(app) -> dict[str, dict]:
    """Negative cases per operation from the served OpenAPI spec, deduplicated by their exact request."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core import NotSet

    spec = app.request("GET", "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    cases: dict[str, dict] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

        @settings(max_examples=EXAMPLES_PER_OPERATION, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(strategy)
        def collect(case) -> None:
            query = case.query or {}
            if any(value == [] for value in query.values()):
                return  # an empty list never reaches the wire: what is left may be a valid request
            headers = {k: str(v) for k, v in (case.headers or {}).items()}
            content = None
            if not isinstance(case.body, NotSet):
                content = case.body if isinstance(case.body, bytes | str) else json.dumps(case.body)
                headers.setdefault("content-type", case.media_type or "application/json")
            wire = httpx.Request(case.method, f"{app.base_url}{case.formatted_path}", params=query, content=content)
            cases.setdefault(f"{wire.method} {wire.url} {wire.content!r}", {
                "method": case.method, "path": case.formatted_path, "params": query, "headers": headers, "content": content,
            })

        try:
            collect()
        except Unsatisfiable:  # an operation with nothing to violate (no parameters, no body)
            continue
    return cases


def hand_written_cases(app) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, httpx kwargs): what a schema does not describe."""
    chat = "/v1/chat/completions"
    junk_zip = io.BytesIO()
    with zipfile.ZipFile(junk_zip, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        archive.writestr("adapter_model.safetensors", b"\x00" * 16)
        archive.writestr("../../escape.pkl", b"\x80\x04cos\nsystem\n.")
    pickled = io.BytesIO()
    with zipfile.ZipFile(pickled, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        archive.writestr("adapter_model.bin", b"\x80\x04cos\nsystem\n.")
    wrong_shape = io.BytesIO()
    import torch
    from safetensors.torch import save as save_safetensors

    with zipfile.ZipFile(wrong_shape, "w") as archive:
        archive.writestr("adapter_config.json", json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                            "peft_type": "LORA"}))
        archive.writestr("adapter_model.safetensors", save_safetensors({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 7),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(5, 8),
        }))
    big = app_limit(app, "max_body_bytes") + 1
    tokens_limit = app_limit(app, "max_feedback_tokens")
    cases = [
        ("traversal model", "POST", chat, {"json": {"model": "../../etc/passwd", "messages": QUESTION}}),
        ("absolute model", "POST", chat, {"json": {"model": "/etc/passwd", "messages": QUESTION}}),
        ("encoded traversal init", "POST", "/v1/lora/init", {"json": {"lora_id": "..%2F..%2Fetc"}}),
        ("dot segments init", "POST", "/v1/lora/init", {"json": {"lora_id": "hostile/.."}}),
        ("absolute init", "POST", "/v1/lora/init", {"json": {"lora_id": "/etc/passwd"}}),
        ("three segments init", "POST", "/v1/lora/init", {"json": {"lora_id": "a/b/c"}}),
        ("null byte init", "POST", "/v1/lora/init", {"json": {"lora_id": "hostile/a\u0000b"}}),
        ("unicode init", "POST", "/v1/lora/init", {"json": {"lora_id": "hostile/ünï"}}),
        ("traversal get", "GET", "/v1/lora/..%2F..%2Fetc%2Fpasswd", {}),
        ("traversal export", "GET", "/v1/lora/export", {"params": {"lora_id": "../../etc/passwd"}}),
        ("traversal delete", "DELETE", "/v1/lora", {"params": {"lora_id": "../hostile"}}),
        ("traversal import", "POST", "/v1/lora/import", {"params": {"lora_id": "../x"}, "content": b"PK"}),
        ("zip with a path escape and a pickle", "POST", "/v1/lora/import",
         {"params": {"lora_id": "hostile/zip1"}, "content": junk_zip.getvalue()}),
        ("zip with a pickled model", "POST", "/v1/lora/import",
         {"params": {"lora_id": "hostile/zip2"}, "content": pickled.getvalue()}),
        ("zip with tensors of the wrong shape", "POST", "/v1/lora/import",
         {"params": {"lora_id": "hostile/zip3"}, "content": wrong_shape.getvalue()}),
        ("not a zip", "POST", "/v1/lora/import", {"params": {"lora_id": "hostile/zip4"}, "content": b"\x00" * 64}),
        ("body over the cap", "POST", chat, {"content": b"x" * big, "headers": {"content-type": "application/json"}}),
        ("chunked body over the cap", "POST", chat,
         {"content": iter([b"{" + b" " * (big // 2), b" " * (big // 2) + b"}"]), "headers": {"content-type": "application/json"}}),
        ("too many messages", "POST", chat, {"json": {"model": BASE, "messages": QUESTION * 300}}),
        ("max_tokens beyond the context", "POST", chat, {"json": {"model": BASE, "messages": QUESTION, "max_tokens": 10**9}}),
        ("max_tokens zero", "POST", chat, {"json": {"model": BASE, "messages": QUESTION, "max_tokens": 0}}),
        ("prompt beyond the context", "POST", "/v1/completions",
         {"json": {"model": BASE, "prompt": "word " * 9000, "max_tokens": 1}}),
        ("n > 1", "POST", chat, {"json": {"model": BASE, "messages": QUESTION, "n": 3}}),
        ("a tool call required", "POST", chat, {"json": {"model": BASE, "messages": QUESTION, "tool_choice": "required",
                                                           "tools": [{"type": "function", "function": {"name": "f"}}]}}),
        ("a malformed tool", "POST", chat, {"json": {"model": BASE, "messages": QUESTION, "tools": [{"type": "shell"}]}}),
        ("image part", "POST", chat, {"json": {"model": BASE, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}}),
        ("unknown role", "POST", chat, {"json": {"model": BASE, "messages": [{"role": "root", "content": "hi"}]}}),
        ("deeply nested JSON", "POST", chat, {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}}),
        ("invalid UTF-8", "POST", chat, {"content": b'{"model": "\xff\xfe"}', "headers": {"content-type": "application/json"}}),
        ("NaN temperature", "POST", chat, {"content": b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                                            "headers": {"content-type": "application/json"}}),
        ("feedback over the token limit", "POST", "/v1/feedback",
         {"json": {"lora_id": "hostile/known", "prompt": "a", "response": "b", "feedback": "😀 " * (tokens_limit // 2 + 10)}}),
        ("feedback with config overrides at the top", "POST", "/v1/feedback",
         {"json": {"lora_id": "hostile/known", "prompt": "a", "response": "b", "feedback": "c", "learning_rate": 10}}),
        ("feedback naming a foreign completion", "POST", "/v1/feedback",
         {"json": {"completion_id": "chatcmpl-../../etc", "feedback": "c"}}),
        ("feedback too many items", "POST", "/v1/feedback", {"json": {"items": [
            {"lora_id": "hostile/known", "prompt": "a", "response": "b", "feedback": "c"}] * (MAX_PENDING_PER_ADAPTER + 1)}}),
        ("feedback status traversal", "GET", "/v1/feedback/..%2F..%2Fetc", {}),
        ("rollback negative", "POST", "/v1/lora/hostile/known/rollback", {"json": {"version": -1}}),
        ("rollback future", "POST", "/v1/lora/hostile/known/rollback", {"json": {"version": 99}}),
        ("export missing version", "GET", "/v1/lora/hostile/known/export", {"params": {"version": 42}}),
        ("dashboard plot traversal", "GET", "/dashboard/eval/..%2F..%2F..%2Fetc/compliance.png", {}),
        ("tenant outside its namespace", "POST", "/v1/lora/init",
         {"json": {"lora_id": "hostile/x"}, "headers": {"authorization": f"Bearer {TENANT_KEYS['alice']}"}}),
        ("no key", "GET", "/v1/models", {"headers": {"authorization": ""}}),
        ("wrong method", "PUT", "/v1/chat/completions", {"json": {}}),
        ("unknown route", "GET", "/v1/../../etc/passwd", {}),
    ]
    return cases


def raw_http(app, data: bytes) -> tuple[int, bytes]:
    """One request written by hand on a socket; the status and the body of the answer."""
    host, port = app.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def app_limit(app, name: str) -> int:
    from claas_ray.config import RouterConfig

    return getattr(RouterConfig(), name)


def test_hostile_requests_get_openai_shaped_4xx_and_the_app_stays_healthy(app):
    before = reference_answer(app)
    assert app.request("POST", "/v1/lora/init", json={"lora_id": "hostile/known"}).status_code == 201
    sent = 0
    generated = schema_cases(app)
    for name, request in generated.items():
        headers = {**app.headers(), **request.pop("headers")}
        response = httpx.request(request.pop("method"), f"{app.base_url}{request.pop('path')}", headers=headers,
                                 timeout=120, **request)
        assert_openai_error(response, name)
        sent += 1
    for name, method, path, kwargs in hand_written_cases(app):
        headers = {**app.headers(), **kwargs.pop("headers", {})}
        if headers.get("authorization") == "":
            headers.pop("authorization")
        response = httpx.request(method, f"{app.base_url}{path}", headers=headers, timeout=120, **kwargs)
        assert_openai_error(response, name)
        sent += 1
    # A declared length over the cap is refused before any of the body is read (httpx will not send such a lie).
    status, body = raw_http(app, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Authorization: Bearer " + app.admin_key.encode() + b"\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 999999999\r\n\r\n{}")
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", (status, body)
    sent += 1
    assert sent >= MIN_DISTINCT_CASES, f"only {sent} distinct hostile requests ({len(generated)} from schemathesis)"

    # Healthy and correct afterwards: the same answer, nothing stray was created, the adapter is intact.
    assert httpx.get(f"{app.base_url}/health", timeout=30).status_code == 200
    assert reference_answer(app) == before
    loras = app.request("GET", "/v1/lora", params={"prefix": "hostile/"}).json()["loras"]
    assert loras == ["hostile/known"], loras
    assert app.request("GET", "/v1/lora/hostile/known").json()["latest_version"] == 0
