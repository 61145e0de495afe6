"""`claas-ray replay FILE.jsonl`: send recorded feedback through the API, in order, and wait for each.

Each line is one feedback item in the API's shape: `{"completion_id", "feedback"}`, or
`{"messages" | "prompt", "response", "feedback"}`; `--lora-id` fills in (or overrides) the adapter.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm


def read_items(path: Path, lora_id: str | None) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if not isinstance(item, dict) or "feedback" not in item:
            raise ValueError(f"{path}:{number}: each line must be an object with a 'feedback' field")
        if lora_id is not None:
            item["lora_id"] = lora_id
        items.append(item)
    return items


def replay(
    path: Path, url: str, lora_id: str | None = None, api_key: str | None = None, timeout_s: float = 600.0,
    init: bool = False,
) -> dict[str, Any]:
    """Post every item with wait=true; returns a summary (counts by status, final version)."""
    items = read_items(path, lora_id)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    outcomes: Counter[str] = Counter()
    last_version = None
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
        if init and lora_id is not None:
            response = client.post("/v1/lora/init", json={"lora_id": lora_id})
            if response.status_code not in (201, 409):
                raise RuntimeError(f"could not create {lora_id}: {response.status_code} {response.text}")
        for item in tqdm(items, desc="feedback", unit="item", file=sys.stderr):
            response = client.post("/v1/feedback", json={**item, "wait": True, "wait_timeout_s": timeout_s})
            if response.status_code >= 400:
                outcomes["error"] += 1
                tqdm.write(f"error {response.status_code}: {response.json().get('error', {}).get('message')}", file=sys.stderr)
                continue
            for status in response.json()["items"]:
                outcomes[status["status"]] += 1
                if status["status"] == "applied":
                    last_version = status["version"]
                elif status["status"] == "rejected":
                    tqdm.write(f"rejected: {status['reason']}", file=sys.stderr)
    return {"items": len(items), "outcomes": dict(outcomes), "last_version": last_version}
