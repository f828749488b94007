"""Spot / preemption notices from the cloud's metadata service (AWS, GCP, Azure). URLs are configurable.

Each provider has a pure `parse_*` (HTTP status + body -> notice or None) and one poll loop drives them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("crosslogic.agent.spot")

AWS_URL = "http://169.254.169.254/latest/meta-data/spot/instance-action"
GCP_URL = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
AZURE_URL = "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"


@dataclass(frozen=True)
class SpotNotice:
    provider: str
    detail: str


def parse_aws(status: int, body: str) -> SpotNotice | None:
    """IMDS answers 404 until a reclaim is scheduled, then {"action": "terminate|stop", "time": ...}."""
    if status != 200:
        return None
    try:
        action = json.loads(body).get("action")
    except (ValueError, AttributeError):
        return None
    return SpotNotice("aws", f"{action} {body.strip()}") if action in ("terminate", "stop", "hibernate") else None


def parse_gcp(status: int, body: str) -> SpotNotice | None:
    return SpotNotice("gcp", "preempted") if status == 200 and body.strip().upper() == "TRUE" else None


def parse_azure(status: int, body: str) -> SpotNotice | None:
    if status != 200:
        return None
    try:
        events = json.loads(body).get("Events", [])
    except (ValueError, AttributeError):
        return None
    for event in events:
        if event.get("EventType") in ("Preempt", "Terminate"):
            return SpotNotice("azure", f"{event.get('EventType')} {event.get('NotBefore', '')}".strip())
    return None


@dataclass(frozen=True)
class Watch:
    url: str
    parse: Callable[[int, str], SpotNotice | None]
    headers: tuple[tuple[str, str], ...] = ()


def watches(aws_url: str | None, gcp_url: str | None, azure_url: str | None) -> list[Watch]:
    found = []
    if aws_url:
        found.append(Watch(aws_url, parse_aws))
    if gcp_url:
        found.append(Watch(gcp_url, parse_gcp, (("Metadata-Flavor", "Google"),)))
    if azure_url:
        found.append(Watch(azure_url, parse_azure, (("Metadata", "true"),)))
    return found


async def watch_for_notice(session: aiohttp.ClientSession, targets: list[Watch], interval_s: float,
                           on_notice: Callable[[SpotNotice], Awaitable[None]]) -> None:
    """Polls every target until one reports a notice, calls `on_notice` once, and returns."""
    while targets:
        for target in targets:
            try:
                async with session.get(target.url, headers=dict(target.headers),
                                       timeout=aiohttp.ClientTimeout(total=2)) as response:
                    notice = target.parse(response.status, await response.text())
            except (aiohttp.ClientError, TimeoutError):
                continue  # no metadata service here (or it hiccuped): keep watching
            if notice is not None:
                await on_notice(notice)
                return
        await asyncio.sleep(interval_s)
