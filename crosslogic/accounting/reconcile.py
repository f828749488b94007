"""Reconciliation (seed §38): ledger vs Stripe vs the nodes' own token counters; drift per org and model.

- Ledger vs Stripe, per org: the billable micro-dollars of exported rows in the window against Stripe's
  meter event summary for the org's customer. Stripe holding less means exports went missing: those
  exports are put back to `pending` and the reporter sends them again under the same identifiers (Stripe
  counts an identifier once, so this cannot double-bill what it did receive).
- Ledger vs nodes, per model: the engines' cumulative token counters (vLLM's `vllm:prompt_tokens_total` /
  `vllm:generation_tokens_total`, SGLang's `sglang:prompt_tokens_total` / `sglang:generation_tokens_total`)
  (labelled model_name) against the ledger's tokens for that model. The counters are since the node
  started, so this comparison is meaningful over a node's lifetime (the caller picks the window); a cut
  stream leaves the node one token ahead (the token whose write failed).
"""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime

import asyncpg
import stripe
from prometheus_client.parser import text_string_to_metric_families

from crosslogic.accounting.reporter import COST_METER
from crosslogic.agent.metrics import RANK_LABELS

_LEDGER_BY_ORG_SQL = """
SELECT u.org_id::text AS org_id, coalesce(o.stripe_customer_id, o.org_id::text) AS customer,
       coalesce(sum(u.billable_microdollars) FILTER (WHERE e.status = 'sent'), 0)::bigint AS exported,
       count(*) FILTER (WHERE u.export_id IS NULL OR e.status <> 'sent') AS not_yet_exported
FROM usage_records u JOIN orgs o ON o.org_id = u.org_id
LEFT JOIN billing_exports e ON e.export_id = u.export_id
WHERE u.occurred_at >= $1 AND u.occurred_at < $2 AND u.mode = 'live'
GROUP BY 1, 2
"""
_LEDGER_BY_MODEL_SQL = """
SELECT model, sum(prompt_tokens)::bigint AS prompt, sum(completion_tokens)::bigint AS completion
FROM usage_records WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1
"""
# Nodes that serve (or finish serving) traffic; provisioning/registering ones have no endpoint yet, dead and
# terminated ones no counters to read.
_NODES_SQL = "SELECT endpoint_host, endpoint_port FROM nodes WHERE status IN ('active', 'draining')"
_REQUEUE_SQL = """
UPDATE billing_exports SET status = 'pending', next_attempt_at = now(), regenerations = regenerations + 1
WHERE org_id = $1::uuid AND status = 'sent' AND interval_start >= $2 AND interval_start < $3
"""


@dataclass(frozen=True)
class OrgDrift:
    org_id: str
    ledger_exported_microdollars: int
    stripe_microdollars: int
    not_yet_exported_rows: int

    @property
    def drift(self) -> int:
        return self.stripe_microdollars - self.ledger_exported_microdollars


@dataclass(frozen=True)
class ModelDrift:
    model: str
    ledger_prompt: int
    ledger_completion: int
    node_prompt: int
    node_completion: int


@dataclass(frozen=True)
class Reconciliation:
    orgs: list[OrgDrift]
    models: list[ModelDrift]
    requeued_orgs: list[str]

    def as_dict(self) -> dict:
        return {"orgs": [{**asdict(o), "drift": o.drift} for o in self.orgs],
                "models": [asdict(m) for m in self.models], "requeued_orgs": self.requeued_orgs}


# Cumulative token counters per engine -> (index in the (prompt, generation) pair). SGLang's come from its
# tokenizer manager, one series per model; were a build to label them per rank (tp_rank, ...), those copies are
# the same count and are collapsed by their maximum, as the agent does for its gauges.
_TOKEN_COUNTERS = {"vllm:prompt_tokens_total": 0, "vllm:generation_tokens_total": 1,
                   "sglang:prompt_tokens_total": 0, "sglang:generation_tokens_total": 1}


def parse_engine_token_counters(text: str) -> dict[str, tuple[int, int]]:
    """Prometheus text of a vLLM or SGLang node -> {model_name: (prompt_tokens_total, generation_tokens_total)}."""
    copies: dict[tuple[str, int, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            index = _TOKEN_COUNTERS.get(sample.name)
            if index is None:
                continue
            rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in RANK_LABELS))
            key = (sample.labels.get("model_name", ""), index, rest)
            copies[key] = max(copies.get(key, 0.0), sample.value)
    totals: dict[str, list[int]] = {}
    for (model, index, _), value in copies.items():
        totals.setdefault(model, [0, 0])[index] += int(value)
    return {model: (p, g) for model, (p, g) in totals.items()}


def _fetch_metrics(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


async def node_token_counters(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for node in await conn.fetch(_NODES_SQL):
        try:
            text = await asyncio.to_thread(_fetch_metrics, node["endpoint_host"], node["endpoint_port"])
        except OSError:
            continue  # an unreachable node is reported by its health, not here
        for model, (p, g) in parse_engine_token_counters(text).items():
            old = totals.get(model, (0, 0))
            totals[model] = (old[0] + p, old[1] + g)
    return totals


def _stripe_total(client: stripe.StripeClient, meter_id: str, customer: str, start: datetime, end: datetime) -> int:
    summaries = client.v1.billing.meters.event_summaries.list(meter_id, params={
        "customer": customer, "start_time": int(start.timestamp()), "end_time": int(end.timestamp())})
    return int(sum(s.aggregated_value for s in summaries.data))


async def reconcile(pool: asyncpg.Pool, client: stripe.StripeClient, start: datetime, end: datetime,
                    meter: str = COST_METER, requeue_missing: bool = True) -> Reconciliation:
    meters = await asyncio.to_thread(client.v1.billing.meters.list)
    meter_id = next((m.id for m in meters.data if m.event_name == meter), None)
    async with pool.acquire() as conn:
        ledger_orgs = await conn.fetch(_LEDGER_BY_ORG_SQL, start, end)
        ledger_models = await conn.fetch(_LEDGER_BY_MODEL_SQL, start, end)
        nodes = await node_token_counters(conn)
    orgs = []
    for row in ledger_orgs:
        stripe_total = 0 if meter_id is None else await asyncio.to_thread(
            _stripe_total, client, meter_id, row["customer"], start, end)
        orgs.append(OrgDrift(row["org_id"], row["exported"], stripe_total, row["not_yet_exported"]))
    requeued = []
    if requeue_missing:
        async with pool.acquire() as conn:
            for org in orgs:
                if org.drift < 0:
                    await conn.execute(_REQUEUE_SQL, org.org_id, start, end)
                    requeued.append(org.org_id)
    by_model = {r["model"]: (r["prompt"], r["completion"]) for r in ledger_models}
    models = [ModelDrift(m, *by_model.get(m, (0, 0)), *nodes.get(m, (0, 0)))
              for m in sorted(set(by_model) | set(nodes))]
    return Reconciliation(orgs, models, requeued)
