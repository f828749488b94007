"""The fleet's parts without a stack: SGLang's metrics as the agent reads them, the warm-up benchmark against both
simulator personas, disk cleanup, and the SkyPilot task checked by SkyPilot's own schema validation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import aiohttp
import pytest

from crosslogic import pki
from crosslogic.agent.disk import Entry, clean_model_dir, plan_cleanup
from crosslogic.agent.metrics import parse_engine_metrics, tokens_per_sec
from crosslogic.agent.warmup import benchmark
from crosslogic.fleet.provider import NodeSpec
from crosslogic.fleet.skypilot import SkyPilotProvider, task_config
from crosslogic.sim.server import SimulatorConfig, running_simulator

SGLANG_TP2 = """
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 4.0
sglang:num_running_reqs{engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 4.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="m",pp_rank="0",priority="",tp_rank="0"} 7.0
sglang:num_queue_reqs{engine_type="unified",model_name="m",pp_rank="0",priority="0",tp_rank="0"} 5.0
sglang:num_queue_reqs{engine_type="unified",model_name="m",pp_rank="0",priority="1",tp_rank="0"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 0.83
sglang:token_usage{engine_type="unified",model_name="m",pp_rank="0",tp_rank="1"} 0.81
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{engine_type="unified",model_name="m",pp_rank="0",tp_rank="0"} 1830.5
# TYPE sglang:generation_tokens counter
sglang:generation_tokens_total{model_name="m",is_streaming="true"} 900.0
sglang:generation_tokens_total{model_name="m",is_streaming="false"} 100.0
"""


def test_sglang_ranks_are_one_scheduler_and_priority_buckets_are_not_counted_twice():
    sample = parse_engine_metrics(SGLANG_TP2, at=10.0)
    assert sample.engine == "sglang"
    assert (sample.requests_running, sample.requests_waiting, sample.kv_cache_usage) == (4.0, 7.0, 0.83)
    assert sample.generation_tokens_total == 1000.0 and sample.gen_throughput is None  # the counter wins
    later = parse_engine_metrics(SGLANG_TP2.replace("900.0", "1400.0"), at=12.0)
    assert tokens_per_sec(sample, later) == 250.0


def test_sglang_without_the_counter_reports_its_own_throughput_gauge():
    text = "\n".join(line for line in SGLANG_TP2.splitlines() if "generation_tokens" not in line)
    assert tokens_per_sec(None, parse_engine_metrics(text, at=1.0)) == 1830.5


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_agent_reads_both_simulator_personas_and_benchmarks_them(engine):
    config = SimulatorConfig(models=("m",), engine=engine, tokens_per_sec=200, max_num_seqs=8)
    async with running_simulator(config) as sim, aiohttp.ClientSession() as session:
        result = await benchmark(session, sim.url, "m", concurrency=4, decode_tokens=11)
        async with session.get(f"{sim.url}/metrics") as response:
            sample = parse_engine_metrics(await response.text(), at=1.0)
    assert sample.engine == engine
    assert sample.generation_tokens_total == 4 * 11 + 1  # the four streams and the one-token prefill probe
    # four sequences decoding at 200 tokens/s each: ~800 tokens/s, whatever the machine's load adds to the wait
    assert 100 <= result.decode_tokens_per_sec <= 800 * 1.05
    assert result.prefill_tokens_per_sec > 0


def test_disk_cleanup_keeps_the_served_model_and_recent_files():
    entries = [Entry("models--meta-llama--Llama-3-8B", 0, 10), Entry("models--old--model", 0, 30),
               Entry("fresh-download", 990, 50), Entry("Llama-3-8B", 0, 1), Entry("other.bin", 0, 20)]
    doomed = plan_cleanup(entries, ["meta-llama/Llama-3-8B"], now=1000, min_age_s=100)
    assert [e.name for e in doomed] == ["models--old--model", "other.bin"]


def test_disk_cleanup_removes_old_models_from_the_directory(tmp_path: Path):
    for name in ("models--acme--served", "models--acme--old"):
        (tmp_path / name / "blobs").mkdir(parents=True)
        (tmp_path / name / "blobs" / "w").write_bytes(b"x" * 100)
    old = time.time() - 7200
    for path in tmp_path.rglob("*"):
        os.utime(path, (old, old))
    removed = clean_model_dir(tmp_path, ["acme/served"], min_age_s=3600)
    assert [e.name for e in removed] == ["models--acme--old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models--acme--served"]


SPEC = NodeSpec(name="n-llama-ap-south-1a2b3c4d", region="ap-south", model="llama-3-8b", cloud="aws",
                gpu_type="L4", accelerators="L4:1", spot=True, engine="vllm", cloud_region="ap-south-1")


def test_skypilot_task_passes_skypilot_validation(tmp_path: Path):
    import sky  # the dev extra installs crosslogic[skypilot]
    pki.init_pki(tmp_path, ["127.0.0.1"])
    provider = SkyPilotProvider(control_plane="cp.example:7443", pki_dir=tmp_path)
    task = provider.build_task(SPEC)  # sky.Task.from_yaml_config: SkyPilot's own schema validation
    (resources,) = task.resources
    assert (resources.use_spot, resources.accelerators, str(resources.cloud), resources.region) == \
        (True, {"L4": 1}, "AWS", "ap-south-1")
    assert "vllm serve llama-3-8b" in task.run and "--control-plane cp.example:7443" in task.run
    assert "--aws-spot-url http://169.254.169.254/latest/meta-data/spot/instance-action" in task.run
    assert "crosslogic[agent]" in task.setup and "vllm" in task.setup
    # The node key travels as a SkyPilot secret, never in envs, the run script or the setup.
    assert "BEGIN" not in task.run + task.setup + str(task.envs)
    assert pki.scope_of(task.secrets["CLNODE_TLS_CERT"].get_secret_value().encode()) == "pool:aws"
    sglang = provider.build_task(NodeSpec(**{**SPEC.__dict__, "engine": "sglang", "spot": False}))
    assert "sglang.launch_server" in sglang.run and "--enable-metrics" in sglang.run and "--spot" not in sglang.run
    with pytest.raises(sky.exceptions.InvalidSkyPilotConfigError):  # what SkyPilot itself refuses
        sky.Task.from_yaml_config({**task_config(SPEC, "cp:1", "crosslogic[agent]", {}),
                                   "resources": {"use_spot": "sometimes"}})
