"""The access-log paths Envoy offers, side by side: Envoy's CPU and the sink's CPU per request, and how soon a
finished request reaches the sink as a usage record (what settlement waits for).

    .venv/bin/python bench/access_log_paths.py [--seconds 4] [--rounds 3] [--concurrency 16]
                                               [--variants none grpc-16k grpc-256k file grpc+file fluentd otel]

A spike, not the gateway: one Envoy per variant (2 workers, same as the stack) with the product's metadata set
on every request (`envoy.filters.http.set_metadata`: ext_authz's keys as the HTTP transport leaves them, the Lua
filter's usage keys) and a direct response, so the only difference between variants is the access log; one sink
process per variant that turns every entry into a UsageRecord with the product's own code
(`record_from_entry` for gRPC ALS, `parse_usage_line` for the file, `record_from_fields` for the others) and
counts it, no ledger or settlement (the same for every path). Variants, measured in interleaved rounds:

- none: no access log (the baseline: Envoy's own cost of the request).
- grpc-16k / grpc-256k: the gRPC ALS (`envoy.access_loggers.http_grpc`) with buffer_size_bytes 16 KiB (the
  old setting) or 256 KiB, buffer_flush_interval 100 ms.
- file: the JSON-lines file log as the only path, tailed every 200 ms (position fsynced per batch); Envoy runs
  with the stack's file flags (`--file-flush-min-size-kb 0`: each line on disk at once, for Envoy SIGKILL).
- grpc+file: what ships: the ALS plus the file log, whose tail skips (unparsed) the ids the ALS delivered.
- fluentd: `envoy.access_loggers.fluentd` (msgpack Forward protocol over TCP), flushed every 100 ms.
- otel: `envoy.access_loggers.open_telemetry` (OTLP logs over gRPC), flushed every 100 ms.

Per variant: req/s, Envoy CPU / request, sink CPU / request, records / requests (1.00 = nothing lost) and the
delay from the end of a request to its record at the sink (mean, max). Only ratios count on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import run_load  # noqa: E402
from crosslogic.contract import AUTHZ_NAMESPACE, USAGE_LOG_FORMAT, USAGE_NAMESPACE, AuthzMeta, UsageMeta  # noqa: E402
from crosslogic.runtime.envoy import envoy_binary  # noqa: E402
from crosslogic.runtime.processes import free_port, port_open, wait_until  # noqa: E402

# As the stack runs Envoy (runtime/envoy.py: every usage line on disk at once, for Envoy SIGKILL);
# `--lazy-file-flush` measures Envoy's defaults (64 KiB or 1 s) instead.
FILE_FLUSH_FLAGS = ["--file-flush-min-size-kb", "0", "--file-flush-interval-msec", "100"]
VARIANTS = ("none", "grpc-16k", "grpc-256k", "file", "grpc+file", "fluentd", "otel")
FLUSH = "0.1s"
# ext_authz's metadata as the HTTP transport leaves it (strings), and the Lua filter's usage keys.
AUTHZ = {AuthzMeta.ORG_ID.value: "6f1c2a70-3b7e-4f61-9d55-0c2d9e1f4a10",
         AuthzMeta.ENV_ID.value: "0b7d3e21-5a9c-4c3e-8f0a-7e6d5c4b3a21",
         AuthzMeta.KEY_ID.value: "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c54", AuthzMeta.MODEL.value: "llama-3-8b",
         AuthzMeta.REGION.value: "ap-south", AuthzMeta.ENDPOINT.value: "chat.completions",
         AuthzMeta.STREAMED.value: "false", AuthzMeta.MAX_TOKENS.value: "1", AuthzMeta.PROMPT_ESTIMATE.value: "9",
         AuthzMeta.RESERVE.value: "10", AuthzMeta.LEASE.value: "lease"}
USAGE = {UsageMeta.PROMPT_TOKENS.value: 9, UsageMeta.COMPLETION_TOKENS.value: 1, UsageMeta.FINISHED.value: True,
         UsageMeta.MODE.value: "json"}


def _grpc_common(buffer_bytes: int) -> dict:
    return {"log_name": "crosslogic", "transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": "sink"}},
            "buffer_flush_interval": FLUSH, "buffer_size_bytes": buffer_bytes}


def _loggers(variant: str, log_path: Path) -> list[dict]:
    file_log = {"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(log_path), "log_format": {"json_format": USAGE_LOG_FORMAT}}}

    def als(buffer_bytes: int) -> dict:
        return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": _grpc_common(buffer_bytes)}}

    if variant == "none":
        return []
    if variant == "grpc-16k":
        return [als(16 << 10)]
    if variant == "grpc-256k":
        return [als(256 << 10)]
    if variant == "file":
        return [file_log]
    if variant == "grpc+file":
        return [file_log, als(256 << 10)]
    if variant == "fluentd":
        return [{"name": "envoy.access_loggers.fluentd", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.fluentd.v3.FluentdAccessLogConfig",
            "cluster": "sink", "tag": "crosslogic.usage", "stat_prefix": "fluentd",
            "buffer_flush_interval": FLUSH, "buffer_size_bytes": 16 << 10, "record": USAGE_LOG_FORMAT}}]
    if variant == "otel":
        attributes = [{"key": k, "value": {"string_value": v}} for k, v in USAGE_LOG_FORMAT.items()
                      if k not in ("authz", "usage", "request_id")]
        attributes += [{"key": f"authz.{k}", "value": {"string_value": f"%DYNAMIC_METADATA({AUTHZ_NAMESPACE}:{k})%"}}
                       for k in (m.value for m in AuthzMeta)]
        attributes += [{"key": f"usage.{k}", "value": {"string_value": f"%DYNAMIC_METADATA({USAGE_NAMESPACE}:{k})%"}}
                       for k in (m.value for m in UsageMeta)]
        return [{"name": "envoy.access_loggers.open_telemetry", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3."
                     "OpenTelemetryAccessLogConfig",
            "common_config": _grpc_common(16 << 10), "disable_builtin_labels": True,
            "body": {"string_value": "%REQ(X-REQUEST-ID)%"}, "attributes": {"values": attributes}}}]
    raise ValueError(variant)


def envoy_config(variant: str, port: int, admin: int, sink_port: int, log_path: Path) -> dict:
    cluster: dict = {"name": "sink", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": "sink", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": sink_port}}}}]}]}}
    if variant.startswith("grpc") or variant == "otel":
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "spike",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"object":"chat.completion"}'}}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.set_metadata", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [{"metadata_namespace": AUTHZ_NAMESPACE, "value": AUTHZ},
                             {"metadata_namespace": USAGE_NAMESPACE, "value": USAGE}]}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "access_log": _loggers(variant, log_path),
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [cluster],
        },
    }


# --- the sinks (run as `--sink KIND` in a process of their own) ------------------------------------------------------

class Tally:
    """Records seen and their delay after the request ended; written to a file for the parent to read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.delay_sum = 0.0
        self.delay_max = 0.0
        self.replayed = 0  # by the file tail, with the ALS on (lost by the ALS, or a double)

    def add(self, record, replayed: bool = False) -> None:
        if record is None:
            return
        self.replayed += replayed
        delay = time.time() - record.occurred_at.timestamp() - record.latency_ms / 1000
        self.count += 1
        self.delay_sum += delay
        self.delay_max = max(self.delay_max, delay)

    def reset_max(self) -> None:
        self.delay_max = 0.0

    async def publish(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"count": self.count - self.replayed, "delay_sum": self.delay_sum,
                                       "delay_max": self.delay_max, "replayed": self.replayed}))
            tmp.replace(self.path)


async def _grpc_server(port: int, add) -> None:
    import grpc

    server = grpc.aio.server()
    add(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def sink_als(port: int, tally: Tally, committed) -> None:
    from envoy.service.accesslog.v3 import als_pb2_grpc

    from crosslogic.accounting.sink import AccessLogSink

    class Ledger:  # the sink's ledger, reduced to counting (and, with the file tail, the ids it has)
        def add(self, record) -> None:
            tally.add(record)
            if committed is not None:
                committed.add_many((record.request_id,))

    sink = AccessLogSink(Ledger())  # type: ignore[arg-type]
    await _grpc_server(port, lambda s: als_pb2_grpc.add_AccessLogServiceServicer_to_server(sink, s))


async def sink_file(log_path: Path, tally: Tally, committed) -> None:
    from crosslogic.accounting.backstop import POLL_INTERVAL_S, BackstopReplayer, UsageLogTailer, parse_usage_line
    from crosslogic.settings import Settings

    tailer = UsageLogTailer(log_path, log_path.with_name(log_path.name + ".position"))
    # The shipping backstop's choice of lines (grace, skip what the ALS delivered), without its ledger.
    backstop = BackstopReplayer(tailer, None, committed=committed, grace_s=Settings().backstop_grace_s)  # type: ignore[arg-type]
    while True:
        lines, position = tailer.read_lines()
        if lines and committed is not None:
            lines, position, _ = backstop._due(lines, position)
        for line in lines:
            tally.add(parse_usage_line(line), replayed=committed is not None)
        if lines:
            await asyncio.to_thread(tailer.commit, position)
        else:
            await asyncio.sleep(max(POLL_INTERVAL_S, backstop.wait_s))


async def sink_fluentd(port: int, tally: Tally) -> None:
    import msgpack

    from crosslogic.accounting.backstop import parse_usage_fields

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        while data := await reader.read(1 << 16):
            unpacker.feed(data)
            for message in unpacker:  # Forward mode: [tag, [[time, record], ...], option?]
                for entry in message[1]:
                    record = entry[1]
                    tally.add(parse_usage_fields(record if isinstance(record, dict)
                                                 else msgpack.unpackb(record, raw=False)))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    await server.serve_forever()


async def sink_otel(port: int, tally: Tally, debug: bool = False) -> None:
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

    from crosslogic.accounting.backstop import parse_usage_fields

    def _value(text: str) -> object:
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def export(request, context):
        if debug:
            print(request, file=sys.stderr)
        for resource in request.resource_logs:
            # The installed opentelemetry-proto may predate the rename (instrumentation_library_logs / logs are
            # the same fields, 2 and 2, as scope_logs / log_records).
            scopes = resource.scope_logs if hasattr(resource, "scope_logs") else resource.instrumentation_library_logs
            for scope in scopes:
                for log_record in (scope.log_records if hasattr(scope, "log_records") else scope.logs):
                    fields: dict = {"request_id": log_record.body.string_value, "authz": {}, "usage": {}}
                    for kv in log_record.attributes:
                        group, _, key = kv.key.partition(".")
                        if key:
                            if kv.value.string_value not in ("", "-"):
                                fields[group][key] = (kv.value.string_value if group == "authz"
                                                      else _value(kv.value.string_value))
                        else:
                            fields[group] = kv.value.string_value
                    tally.add(parse_usage_fields(fields))
        return logs_service_pb2.ExportLogsServiceResponse()

    handler = grpc.method_handlers_generic_handler("opentelemetry.proto.collector.logs.v1.LogsService", {
        "Export": grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=logs_service_pb2.ExportLogsServiceRequest.FromString,
            response_serializer=logs_service_pb2.ExportLogsServiceResponse.SerializeToString)})
    await _grpc_server(port, lambda s: s.add_generic_rpc_handlers((handler,)))


async def run_sink(kind: str, port: int, log_path: Path, tally_path: Path) -> None:
    from crosslogic.accounting.recent import RecentIds

    tally = Tally(tally_path)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, tally.reset_max)  # after the warm-up
    tasks = [asyncio.create_task(tally.publish())]
    committed = RecentIds() if kind == "grpc+file" else None
    if kind.startswith("grpc"):
        tasks.append(asyncio.create_task(sink_als(port, tally, committed)))
    if kind in ("file", "grpc+file"):
        tasks.append(asyncio.create_task(sink_file(log_path, tally, committed)))
    if kind == "fluentd":
        tasks.append(asyncio.create_task(sink_fluentd(port, tally)))
    if kind == "otel":
        tasks.append(asyncio.create_task(sink_otel(port, tally)))
    await asyncio.gather(*tasks)


# --- the measurement -----------------------------------------------------------------------------------------------

class Target:
    def __init__(self, variant: str, state: Path) -> None:
        self.variant = variant
        self.port, admin, sink_port = free_port(), free_port(), free_port()
        self.log_path = state / f"{variant}.jsonl"
        self.tally_path = state / f"{variant}.tally.json"
        self.sink = subprocess.Popen([sys.executable, __file__, "--sink", variant, "--sink-port", str(sink_port),
                                      "--log-path", str(self.log_path), "--tally", str(self.tally_path)])
        config = state / f"{variant}.envoy.json"
        config.write_text(json.dumps(envoy_config(variant, self.port, admin, sink_port, self.log_path)))
        self.envoy = subprocess.Popen([str(envoy_binary()), "-c", str(config), "--log-level", "error",
                                       "--concurrency", "2", "--base-id", str(free_port()),
                                       *FILE_FLUSH_FLAGS],
                                      stdout=open(state / f"{variant}.envoy.log", "wb"), stderr=subprocess.STDOUT)
        wait_until(lambda: port_open("127.0.0.1", self.port), 30, f"envoy ({variant})", self.envoy)
        # A GET: Envoy closes the connection after a direct response to a request whose body it has not read.
        self.request = f"GET /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        self.sent = 0
        self.requests = 0
        self.seconds = 0.0
        self.envoy_cpu = 0.0
        self.sink_cpu = 0.0

    def tally(self) -> dict:
        try:
            return json.loads(self.tally_path.read_text())
        except (OSError, ValueError):
            return {"count": 0, "delay_sum": 0.0, "delay_max": 0.0}

    @staticmethod
    def _cpu(proc: subprocess.Popen) -> float:
        times = psutil.Process(proc.pid).cpu_times()
        return times.user + times.system

    async def round(self, concurrency: int, seconds: float) -> None:
        before = self._cpu(self.envoy), self._cpu(self.sink)
        result = await run_load("127.0.0.1", self.port, self.request, concurrency, seconds, warmup_s=0)
        self.sent += result.requests + result.errors
        if self.variant != "none":  # wait for the sink to have every record (at most 5 s)
            deadline = time.monotonic() + 5
            while self.tally()["count"] < self.sent and time.monotonic() < deadline:  # noqa: ASYNC110 (a file)
                await asyncio.sleep(0.1)
        after = self._cpu(self.envoy), self._cpu(self.sink)
        self.requests += result.requests
        self.seconds += result.seconds
        self.envoy_cpu += after[0] - before[0]
        self.sink_cpu += after[1] - before[1]

    def stop(self) -> None:
        for proc in (self.envoy, self.sink):
            proc.terminate()
        for proc in (self.envoy, self.sink):
            proc.wait(10)


async def measure(targets: list[Target], rounds: int, concurrency: int, seconds: float) -> None:
    for target in targets:  # warm up every path (connections, the sink's first imports)
        await run_load("127.0.0.1", target.port, target.request, concurrency, 1, warmup_s=0)
    await asyncio.sleep(1)
    for target in targets:
        target.sent = target.tally()["count"]
        target.sink.send_signal(signal.SIGUSR1)
    await asyncio.sleep(0.5)
    start = {t.variant: t.tally() for t in targets}
    for round_ in range(rounds):
        shift = round_ % len(targets)
        for target in targets[shift:] + targets[:shift]:
            await target.round(concurrency, seconds)
    base = next((t for t in targets if t.variant == "none"), None)
    print(f"-- concurrency {concurrency}, {rounds} rounds x {seconds:g} s, interleaved")
    print(f"{'variant':<11} {'req/s':>7} {'ratio':>6} {'envoy ms/req':>13} {'+ vs none':>10} {'sink ms/req':>12} "
          f"{'records':>8} {'delay mean':>11} {'delay max':>10} {'by tail':>8}")
    for target in targets:
        tally, first = target.tally(), start[target.variant]
        records = tally["count"] - first["count"]
        envoy = 1000 * target.envoy_cpu / target.requests
        base_envoy = 1000 * base.envoy_cpu / base.requests if base else 0.0
        rps = target.requests / target.seconds
        ratio = rps / (base.requests / base.seconds) if base else 1.0
        delay = f"{1000 * (tally['delay_sum'] - first['delay_sum']) / records:.0f} ms" if records else "-"
        delay_max = f"{1000 * tally['delay_max']:.0f} ms" if records else "-"
        share = f"{records / target.requests:.2f}" if target.variant != "none" else "-"
        print(f"{target.variant:<11} {rps:>7.0f} {ratio:>6.2f} {envoy:>13.3f} {envoy - base_envoy:>+10.3f} "
              f"{1000 * target.sink_cpu / target.requests:>12.3f} {share:>8} {delay:>11} {delay_max:>10} "
              f"{tally.get('replayed', 0) - first.get('replayed', 0):>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--sink", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--sink-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tally", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lazy-file-flush", action="store_true", help="Envoy's default file flushing")
    args = parser.parse_args()
    if args.lazy_file_flush:
        FILE_FLUSH_FLAGS.clear()
    if args.sink:
        asyncio.run(run_sink(args.sink, args.sink_port, args.log_path, args.tally))
        return 0
    with tempfile.TemporaryDirectory(prefix="clp-alp-") as tmp:
        targets: list[Target] = []
        try:
            for variant in args.variants:
                targets.append(Target(variant, Path(tmp)))
            asyncio.run(measure(targets, args.rounds, args.concurrency, args.seconds))
        finally:
            for target in targets:
                target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
