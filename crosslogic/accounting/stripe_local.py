"""A local Stripe-compatible server for tests and demos: only the Billing Meter endpoints we use.

The official `stripe` SDK points at it (StripeClient(base_addresses={"api": url})); nothing goes to the
internet. Behaviour copied from Stripe's documentation:
- form-encoded requests, `Authorization: Bearer sk_...`, errors as {"error": {"type", "message", "code",
  "param"}} with 400/401/404/5xx;
- `Idempotency-Key`: the same key with the same parameters replays the first response (header
  `Idempotent-Replayed: true`); with different parameters it is a 400 `idempotency_error`;
- meter events: `identifier` is unique (a repeat is refused with code `resource_already_exists`; Stripe
  documents uniqueness over at least 24 h, the exact refusal shape is our assumption), timestamps in the
  past 35 days or up to 5 minutes ahead, values are integers in `payload[value]`;
- event summaries sum `value` per customer and meter over [start_time, end_time).
Test-only controls live under /_local/ (fault injection, the events received).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

MAX_PAST_S = 35 * 24 * 3600
MAX_FUTURE_S = 5 * 60


def _error(status: int, message: str, error_type: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> web.Response:
    body = {"error": {"type": error_type, "message": message, "code": code, "param": param}}
    return web.json_response(body, status=status, headers={"Request-Id": f"req_{time.time_ns():x}"})


@dataclass
class LocalStripe:
    """All state of the fake: meters, accepted events, idempotency records, injected faults."""

    api_key_prefix: str = "sk_test_"
    meters: dict[str, dict] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    idempotency: dict[str, tuple[str, int, dict]] = field(default_factory=dict)
    fail_next: int = 0
    fail_status: int = 500
    requests_seen: int = 0
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth_and_idempotency])
        app.router.add_post("/v1/billing/meters", self.create_meter)
        app.router.add_get("/v1/billing/meters", self.list_meters)
        app.router.add_post("/v1/billing/meter_events", self.create_meter_event)
        app.router.add_get("/v1/billing/meters/{meter_id}/event_summaries", self.event_summaries)
        app.router.add_post("/_local/faults", self.set_faults)
        app.router.add_get("/_local/events", self.list_events)
        return app

    @web.middleware
    async def _auth_and_idempotency(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/_local/"):
            return await handler(request)
        self.requests_seen += 1
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not key.startswith(self.api_key_prefix):
            return _error(401, "Invalid API Key provided.", code="api_key_invalid")
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(self.fail_status, "An unknown error occurred (injected).", "api_error")
        idem = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not idem:
            return await handler(request)
        form = dict(await request.post())
        fingerprint = hashlib.sha256(json.dumps([request.path, form], sort_keys=True).encode()).hexdigest()
        seen = self.idempotency.get(idem)
        if seen is not None:
            if seen[0] != fingerprint:
                return _error(400, "Keys for idempotent requests can only be used with the same parameters "
                                   "they were first used with.", "idempotency_error")
            return web.json_response(seen[2], status=seen[1], headers={"Idempotent-Replayed": "true"})
        response = await handler(request)
        if isinstance(response, web.Response) and response.status < 500 and response.body is not None:
            self.idempotency[idem] = (fingerprint, response.status, json.loads(response.body))
        return response

    async def create_meter(self, request: web.Request) -> web.Response:
        form = await request.post()
        event_name = form.get("event_name")
        if not event_name:
            return _error(400, "Missing required param: event_name.", code="parameter_missing", param="event_name")
        if any(m["event_name"] == event_name and m["status"] == "active" for m in self.meters.values()):
            return _error(400, f"An active meter with event_name `{event_name}` already exists.",
                          code="resource_already_exists", param="event_name")
        meter_id = f"mtr_local{next(self._ids):08d}"
        meter = {"id": meter_id, "object": "billing.meter", "event_name": str(event_name),
                 "display_name": str(form.get("display_name", event_name)), "status": "active",
                 "default_aggregation": {"formula": str(form.get("default_aggregation[formula]", "sum"))},
                 "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                 "value_settings": {"event_payload_key": "value"}, "created": int(time.time()), "livemode": False}
        self.meters[meter_id] = meter
        return web.json_response(meter)

    async def list_meters(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "url": "/v1/billing/meters", "has_more": False,
                                  "data": list(self.meters.values())})

    async def create_meter_event(self, request: web.Request) -> web.Response:
        form = await request.post()
        event_name = str(form.get("event_name", ""))
        customer = str(form.get("payload[stripe_customer_id]", ""))
        raw_value = str(form.get("payload[value]", ""))
        identifier = str(form.get("identifier") or f"local_{time.time_ns():x}")
        now = int(time.time())
        timestamp = int(form.get("timestamp", now))
        if not event_name:
            return _error(400, "Missing required param: event_name.", code="parameter_missing", param="event_name")
        if not any(m["event_name"] == event_name for m in self.meters.values()):
            return _error(400, f"No active meter was found for event_name `{event_name}`.",
                          code="resource_missing", param="event_name")
        if not customer:
            return _error(400, "Missing required param: payload[stripe_customer_id].", code="parameter_missing",
                          param="payload[stripe_customer_id]")
        if not raw_value.lstrip("-").isdigit():
            return _error(400, "payload[value] must be an integer.", code="parameter_invalid_integer",
                          param="payload[value]")
        if not now - MAX_PAST_S <= timestamp <= now + MAX_FUTURE_S:
            return _error(400, "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
                          code="timestamp_out_of_range", param="timestamp")
        if identifier in self.identifiers:
            return _error(400, f"An event with identifier `{identifier}` already exists.",
                          code="resource_already_exists", param="identifier")
        self.identifiers.add(identifier)
        event = {"object": "billing.meter_event", "created": now, "event_name": event_name,
                 "identifier": identifier, "livemode": False,
                 "payload": {"stripe_customer_id": customer, "value": raw_value}, "timestamp": timestamp}
        self.events.append(event)
        return web.json_response(event)

    async def event_summaries(self, request: web.Request) -> web.Response:
        meter = self.meters.get(request.match_info["meter_id"])
        if meter is None:
            return _error(404, f"No such billing meter: '{request.match_info['meter_id']}'", code="resource_missing",
                          param="id")
        customer = request.query.get("customer")
        if not customer:
            return _error(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        start, end = int(request.query.get("start_time", 0)), int(request.query.get("end_time", 2**62))
        total = sum(int(e["payload"]["value"]) for e in self.events
                    if e["event_name"] == meter["event_name"] and e["payload"]["stripe_customer_id"] == customer
                    and start <= e["timestamp"] < end)
        summary = {"id": f"mtrusg_{meter['id']}_{customer}", "object": "billing.meter_event_summary",
                   "aggregated_value": total, "start_time": start, "end_time": end, "livemode": False,
                   "meter": meter["id"]}
        return web.json_response({"object": "list", "has_more": False, "data": [summary],
                                  "url": request.path})

    async def set_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fail_next = int(body.get("fail_next", 0))
        self.fail_status = int(body.get("status", 500))
        return web.json_response({"fail_next": self.fail_next})

    async def list_events(self, request: web.Request) -> web.Response:
        return web.json_response({"events": self.events})


async def serve_local_stripe(host: str, port: int) -> None:
    runner = web.AppRunner(LocalStripe().app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        await asyncio.Event().wait()  # until cancelled (SIGTERM)
    finally:
        await runner.cleanup()
