"""The model catalogue: list, look up, add / update (prices exact in micro-dollars)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from crosslogic.store.tenancy.common import (
    Db,
    InvalidArgument,
    NotFound,
    audit,
    choice,
    db_errors,
    fetch_one,
    positive,
    to_json,
    transaction,
)

MODEL_KINDS = ("chat", "completion", "embedding")


@dataclass(frozen=True)
class Model:
    model_id: str
    kind: str
    served_name: str | None
    context_length: int
    max_output_tokens: int
    default_max_tokens: int
    vram_gb: int
    tokens_per_sec: int
    input_price_microdollars_per_1m: int
    output_price_microdollars_per_1m: int
    status: str
    created_at: datetime
    max_n: int  # most choices (n, best_of) one request may ask for


def _model(r: asyncpg.Record) -> Model:
    return Model(**{f: r[f] for f in Model.__dataclass_fields__})


_MODEL_COLS = """model_id, kind, served_name, context_length, max_output_tokens, default_max_tokens, vram_gb,
    tokens_per_sec, input_price_microdollars_per_1m, output_price_microdollars_per_1m, status, created_at, max_n"""


SQL_SELECT_MODELS = f"SELECT {_MODEL_COLS} FROM models ORDER BY model_id"


SQL_SELECT_MODEL = f"SELECT {_MODEL_COLS} FROM models WHERE model_id = $1"


SQL_SELECT_MODEL_IDS = "SELECT model_id FROM models WHERE model_id = ANY($1::text[])"
# Upsert where NULL means "keep what is there" (or the schema default for a new model): re-running
# `model add` with one flag changes one field. The COALESCE defaults mirror 001's (and 006's) column defaults.


SQL_UPSERT_MODEL = f"""
INSERT INTO models AS m (model_id, kind, served_name, context_length, max_output_tokens, default_max_tokens,
    vram_gb, tokens_per_sec, input_price_microdollars_per_1m, output_price_microdollars_per_1m, max_n)
VALUES ($1, COALESCE($2::text, 'chat'), $3::text, COALESCE($4::int, 8192), COALESCE($5::int, 4096),
    COALESCE($6::int, 512), COALESCE($7::int, 16), COALESCE($8::int, 1000), COALESCE($9::bigint, 0),
    COALESCE($10::bigint, 0), COALESCE($11::int, 128))
ON CONFLICT (model_id) DO UPDATE SET
    max_n = COALESCE($11, m.max_n),
    kind = COALESCE($2, m.kind),
    served_name = COALESCE($3, m.served_name),
    context_length = COALESCE($4, m.context_length),
    max_output_tokens = COALESCE($5, m.max_output_tokens),
    default_max_tokens = COALESCE($6, m.default_max_tokens),
    vram_gb = COALESCE($7, m.vram_gb),
    tokens_per_sec = COALESCE($8, m.tokens_per_sec),
    input_price_microdollars_per_1m = COALESCE($9, m.input_price_microdollars_per_1m),
    output_price_microdollars_per_1m = COALESCE($10, m.output_price_microdollars_per_1m)
RETURNING {_MODEL_COLS}"""


async def require_models(db: Db, models: Sequence[str]) -> None:
    known = {r["model_id"] for r in await db.fetch(SQL_SELECT_MODEL_IDS, list(models))}
    missing = [m for m in models if m not in known]
    if missing:
        raise NotFound(f"model(s) not found: {', '.join(missing)}")


async def list_models(db: Db) -> list[Model]:
    return [_model(r) for r in await db.fetch(SQL_SELECT_MODELS)]


async def get_model(db: Db, model_id: str) -> Model:
    return _model(await fetch_one(db, f"model {model_id!r} not found", SQL_SELECT_MODEL, model_id))


@db_errors
async def add_model(
    db: Db,
    model_id: str,
    kind: str | None = None,
    served_name: str | None = None,
    context_length: int | None = None,
    max_output_tokens: int | None = None,
    default_max_tokens: int | None = None,
    vram_gb: int | None = None,
    tokens_per_sec: int | None = None,
    input_price_microdollars_per_1m: int | None = None,
    output_price_microdollars_per_1m: int | None = None,
    max_n: int | None = None,
    *,
    actor: str = "system",
    must_exist: bool = False,
) -> Model:
    """Create or update a model; arguments left as None keep their current (or default) value.
    `must_exist`: only update (`model update`), NotFound for an unknown model instead of creating it."""
    if not model_id.strip():
        raise InvalidArgument("model id must be non-empty")
    if kind is not None:
        choice(kind, MODEL_KINDS, "model kind")
    for value, what in (
        (context_length, "context length"),
        (max_output_tokens, "max output tokens"),
        (default_max_tokens, "default max tokens"),
        (tokens_per_sec, "tokens/s"),
        (max_n, "max n (choices per request)"),
    ):
        positive(value, what)
    positive(vram_gb, "VRAM (GB)", zero_ok=True)
    positive(input_price_microdollars_per_1m, "input price", zero_ok=True)
    positive(output_price_microdollars_per_1m, "output price", zero_ok=True)
    async with transaction(db) as conn:
        if must_exist:
            await get_model(conn, model_id)
        row = await conn.fetchrow(
            SQL_UPSERT_MODEL, model_id, kind, served_name, context_length, max_output_tokens,
            default_max_tokens, vram_gb, tokens_per_sec, input_price_microdollars_per_1m,
            output_price_microdollars_per_1m, max_n,
        )  # fmt: skip
        model = _model(row)
        if model.default_max_tokens > model.max_output_tokens:
            raise InvalidArgument(
                f"default max tokens ({model.default_max_tokens}) exceeds max output tokens "
                f"({model.max_output_tokens})"
            )  # raising here rolls the upsert back
        await audit(conn, actor, "model.upsert", "model", model.model_id, to_json(model))
        return model
