"""Raw SSE reading for the reliability tests: every event as sent, [DONE] included."""

from __future__ import annotations

import json
from typing import Any

import httpx


async def stream_events(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, list[str]]:
    """POST a streaming request; return the status and the data of every event, in order."""
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, [resp.text]
        events = [line[len("data: ") :] async for line in resp.aiter_lines() if line.startswith("data: ")]
        return 200, events


def error_events(events: list[str]) -> list[dict[str, Any]]:
    return [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
