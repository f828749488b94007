"""vLLM /metrics (Prometheus text) -> the load figures the agent reports. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class EngineSample:
    at: float  # monotonic seconds
    requests_running: float
    requests_waiting: float
    kv_cache_usage: float
    generation_tokens_total: float
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0


def parse_vllm_metrics(text: str, at: float) -> EngineSample:
    """Sums series over labels (one engine may serve several model names); KV usage is the maximum."""
    sums: dict[str, float] = {}
    kv = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:kv_cache_usage_perc":
                kv = max(kv, sample.value)
            elif sample.name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_sum",
                                 "vllm:time_to_first_token_seconds_count"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return EngineSample(at=at, requests_running=sums.get("vllm:num_requests_running", 0.0),
                        requests_waiting=sums.get("vllm:num_requests_waiting", 0.0), kv_cache_usage=kv,
                        generation_tokens_total=sums.get("vllm:generation_tokens_total", 0.0),
                        ttft_sum_s=sums.get("vllm:time_to_first_token_seconds_sum", 0.0),
                        ttft_count=sums.get("vllm:time_to_first_token_seconds_count", 0.0))


def tokens_per_sec(previous: EngineSample | None, current: EngineSample) -> float:
    """Decode rate between two scrapes; 0 without a previous one or after an engine restart (counter reset)."""
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
