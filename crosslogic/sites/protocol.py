"""What the cloud's site API and a site exchange, as JSON: tenant-view rows (typed values kept exact) and usage
records. Paths of the site API, and the one place both ends build their mutual-TLS contexts."""

from __future__ import annotations

import ssl
from dataclasses import asdict
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from crosslogic.usage_record import UsageRecord

SYNC_PATH = "/site/v1/sync"
USAGE_PATH = "/site/v1/usage"


def encode_value(value: Any) -> Any:
    """A row value as JSON; Decimal, datetime and date tagged so the site reads back exactly what Postgres had."""
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    return value


def decode_value(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        (tag, text), = value.items()
        if tag == "$decimal":
            return Decimal(text)
        if tag == "$datetime":
            return datetime.fromisoformat(text)
        if tag == "$date":
            return date.fromisoformat(text)
    return value


def encode_row(row: Any) -> dict[str, Any]:
    return {k: encode_value(v) for k, v in dict(row).items()}


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: decode_value(v) for k, v in row.items()}


def encode_prices(rows: dict[str, list[tuple]]) -> dict[str, list[list[Any]]]:
    """accounting/pricing.price_rows as JSON (the site prices its bill-cap holds and its own usage with them)."""
    return {table: [[encode_value(v) for v in row] for row in items] for table, items in rows.items()}


def decode_prices(data: dict[str, list[list[Any]]]) -> dict[str, list[tuple]]:
    return {table: [tuple(decode_value(v) for v in row) for row in items] for table, items in data.items()}


def record_to_json(record: UsageRecord) -> dict[str, Any]:
    return {**asdict(record), "occurred_at": record.occurred_at.isoformat()}


def record_from_json(data: dict[str, Any]) -> UsageRecord:
    fields = dict(data)
    fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
    for name in ("status_code", "prompt_tokens", "completion_tokens", "latency_ms"):
        fields[name] = int(fields[name])
    return UsageRecord(**{k: fields[k] for k in UsageRecord.__dataclass_fields__})


def server_context(pki_dir: Path) -> ssl.SSLContext:
    """The cloud side: our server certificate, and only clients with a certificate from our CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki_dir / "ca.pem"))
    context.load_cert_chain(str(pki_dir / "server.pem"), str(pki_dir / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """The site side: the control plane's CA, and the site certificate as the client's."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(str(tls_dir / "node.pem"), str(tls_dir / "node.key"))
    return context
