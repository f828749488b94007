"""Engine /metrics (Prometheus text, vLLM or SGLang) -> the load figures the agent reports. Pure functions.

vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
`vllm:generation_tokens_total`, `vllm:time_to_first_token_seconds`; series are summed over labels (one engine may
serve several model names) and KV use is the maximum.

SGLang (sglang/srt/metrics/collector.py): `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`,
`sglang:gen_throughput`, `sglang:generation_tokens_total`, `sglang:time_to_first_token_seconds`. Its quirks:
* scheduler gauges come once per rank (`tp_rank`, `pp_rank`, `moe_ep_rank`) with the same value: summing them would
  count a TP=8 engine's queue eight times, so ranks are collapsed by their maximum (data-parallel ranks, `dp_rank`,
  are separate schedulers and are summed);
* with priority scheduling a gauge also comes per priority bucket next to an aggregate with `priority=""`: only
  the aggregate is read;
* `gen_throughput` is refreshed only every decode-log interval (40 steps) and stays at its last value when the
  engine goes idle: the rate is taken from the `generation_tokens_total` counter, the gauge only when the counter
  is missing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

RANK_LABELS = frozenset({"tp_rank", "pp_rank", "moe_ep_rank", "attn_tp_rank", "attn_dp_rank"})


@dataclass(frozen=True)
class EngineSample:
    at: float  # monotonic seconds
    requests_running: float
    requests_waiting: float
    kv_cache_usage: float
    generation_tokens_total: float
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    engine: str = "vllm"
    gen_throughput: float | None = None  # SGLang's own (stale-prone) gauge, when there is no counter


_VLLM = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
         "kv": "vllm:kv_cache_usage_perc", "generated": "vllm:generation_tokens_total",
         "ttft_sum": "vllm:time_to_first_token_seconds_sum", "ttft_count": "vllm:time_to_first_token_seconds_count"}
_SGLANG = {"running": "sglang:num_running_reqs", "waiting": "sglang:num_queue_reqs", "kv": "sglang:token_usage",
           "generated": "sglang:generation_tokens_total", "ttft_sum": "sglang:time_to_first_token_seconds_sum",
           "ttft_count": "sglang:time_to_first_token_seconds_count", "throughput": "sglang:gen_throughput"}


def _collapse(series: list[tuple[dict[str, str], float]], combine) -> float | None:
    """SGLang: aggregate-priority series only, ranks collapsed by max, then `combine` over the rest."""
    if not series:
        return None
    if any("priority" in labels for labels, _ in series):
        series = [(labels, v) for labels, v in series if labels.get("priority", "") == ""]
    groups: dict[tuple, float] = defaultdict(lambda: float("-inf"))
    for labels, value in series:
        key = tuple(sorted((k, v) for k, v in labels.items() if k not in RANK_LABELS))
        groups[key] = max(groups[key], value)
    return combine(groups.values()) if groups else None


def parse_engine_metrics(text: str, at: float) -> EngineSample:
    """Either engine's /metrics; which one is told by the series' prefix."""
    wanted = set(_VLLM.values()) | set(_SGLANG.values())
    seen: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                seen[sample.name].append((dict(sample.labels), sample.value))
    if any(name.startswith("sglang:") for name in seen) and not any(name.startswith("vllm:") for name in seen):
        names, engine = _SGLANG, "sglang"
    else:
        names, engine = _VLLM, "vllm"

    def total(key: str, combine=sum) -> float | None:
        series = seen.get(names.get(key, ""), [])
        if engine == "vllm":
            return combine(v for _, v in series) if series else None
        return _collapse(series, combine)

    generated = total("generated")
    return EngineSample(at=at, requests_running=total("running") or 0.0, requests_waiting=total("waiting") or 0.0,
                        kv_cache_usage=total("kv", max) or 0.0, generation_tokens_total=generated or 0.0,
                        ttft_sum_s=total("ttft_sum") or 0.0, ttft_count=total("ttft_count") or 0.0, engine=engine,
                        gen_throughput=total("throughput") if generated is None else None)


def parse_vllm_metrics(text: str, at: float) -> EngineSample:
    """Kept for callers of the vLLM-only parser: the same as parse_engine_metrics."""
    return parse_engine_metrics(text, at)


def tokens_per_sec(previous: EngineSample | None, current: EngineSample) -> float:
    """Decode rate between two scrapes; 0 without a previous one or after an engine restart (counter reset).
    An engine without the counter (an SGLang build that has only the gauge) reports its own gauge."""
    if current.gen_throughput is not None:
        return max(0.0, current.gen_throughput)
    if previous is None or current.at <= previous.at:
        return 0.0
    produced = current.generation_tokens_total - previous.generation_tokens_total
    return max(0.0, produced) / (current.at - previous.at)


def mean_ttft(previous: EngineSample | None, current: EngineSample) -> float:
    """Mean time to first token of the requests that started between two scrapes; 0 when there were none."""
    if previous is None:
        return 0.0
    count = current.ttft_count - previous.ttft_count
    if count <= 0:
        return 0.0
    return max(0.0, current.ttft_sum_s - previous.ttft_sum_s) / count
