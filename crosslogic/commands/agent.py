"""`crosslogic agent ...` and `crosslogic pki ...`: argument parsing only."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
from pathlib import Path

from crosslogic.agent import spot
from crosslogic.agent.engine import Backoff


def _agent(args: argparse.Namespace) -> int:
    from crosslogic.agent.proto import nodeagent_pb2 as pb
    from crosslogic.agent.runner import AgentConfig, RegistrationRefused, run_agent

    host, _, port = args.advertise.rpartition(":")
    registration = pb.RegisterNodeRequest(
        name=args.name, region=args.region, cloud=args.cloud, spot=args.spot, gpu_type=args.gpu_type,
        vram_total_gb=args.vram_gb, vram_free_gb=args.vram_gb, throughput_tokens_per_sec=args.tokens_per_sec,
        models=args.model, endpoint_host=host, endpoint_port=int(port), tailnet_ip=args.tailnet_ip or "",
        reserved_org_id=args.reserved_org or "", model_version=args.model_version, engine=args.engine or "")
    config = AgentConfig(
        control_plane=args.control_plane, registration=registration,
        engine_url=args.engine_url or f"http://{args.advertise}",
        engine_argv=tuple(shlex.split(args.engine_command)) if args.engine_command else (),
        heartbeat_interval_s=args.heartbeat_interval, metrics_interval_s=args.metrics_interval,
        spot_interval_s=args.spot_interval, spot_urls=(args.aws_spot_url, args.gcp_spot_url, args.azure_spot_url),
        drain_timeout_s=args.drain_timeout, tls_dir=Path(args.tls_dir) if args.tls_dir else None,
        backoff=Backoff(initial_s=args.restart_backoff), warmup_requests=args.warmup_requests,
        warmup_decode_tokens=args.warmup_decode_tokens, model_dir=Path(args.model_dir) if args.model_dir else None,
        cleanup_interval_s=args.cleanup_interval, cleanup_min_age_s=args.cleanup_min_age,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host)

    async def main() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await run_agent(config, stopping)

    try:
        asyncio.run(main())
    except RegistrationRefused as exc:
        print(f"crosslogic agent: the control plane refused this node: {exc}", file=sys.stderr)
        return 2
    return 0


def _pki_init(args: argparse.Namespace) -> int:
    from crosslogic import pki

    pki.init_pki(Path(args.dir), args.host)
    print(f"CA and NodeAgent server certificate in {args.dir} (set CROSSLOGIC_PKI_DIR={args.dir} for `serve xds`)")
    return 0


def _pki_issue(args: argparse.Namespace) -> int:
    from crosslogic import pki

    out = Path(args.out)
    pki.write(out, "node", pki.issue_node(pki.load_ca(Path(args.dir)), args.name, args.scope, args.days))
    (out / "ca.pem").write_bytes((Path(args.dir) / pki.CA_CERT).read_bytes())
    print(f"node certificate for {args.name} (scope {args.scope}) in {out}: pass --tls-dir {out} to the agent")
    return 0


def _pki_issue_internal(args: argparse.Namespace) -> int:
    import shutil

    from crosslogic.runtime import internal_tls

    directory = Path(args.dir)
    internal_tls.issue_internal(directory, args.host or ["127.0.0.1", "localhost"], days=args.days)
    print(f"internal CA and certificates for {', '.join((*internal_tls.SERVICES, internal_tls.ENVOY))} in "
          f"{directory} (CROSSLOGIC_INTERNAL_TLS_DIR={directory})")
    if args.secret_dir:
        # What the pods mount: every certificate and key but the CA's key, which stays with whoever issues.
        out = Path(args.secret_dir)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in internal_tls.secret_files():
            shutil.copyfile(directory / name, out / name)
            (out / name).chmod(0o600)
        print(f"the Secret's files in {out}: kubectl -n crosslogic create secret generic crosslogic-internal-tls "
              f"--from-file={out}")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    import asyncpg

    from crosslogic.runtime.state import resolve_settings
    from crosslogic.xds.node_registry import drain_old_versions

    async def main() -> list[str]:
        conn = await asyncpg.connect(resolve_settings(args.state_dir).require_database())
        try:
            return await drain_old_versions(conn, args.model, args.version)
        finally:
            await conn.close()

    drained = asyncio.run(main())
    print(f"draining {len(drained)} node(s) of {args.model} not at {args.version}: {', '.join(drained) or '-'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("agent", help="run the node agent beside a vLLM / SGLang engine")
    a.add_argument("--control-plane", required=True, help="host:port of the NodeAgent API")
    a.add_argument("--name", required=True, help="this node's name (unique in the registry)")
    a.add_argument("--region", required=True, help="region the node serves, e.g. ap-south")
    a.add_argument("--model", action="append", required=True, help="served model id (repeatable)")
    a.add_argument("--advertise", required=True, help="host:port where Envoy reaches the engine")
    a.add_argument("--engine-url", help="where the agent reaches the engine (default: http://ADVERTISE)")
    a.add_argument("--engine-command", help="start and supervise this command (vLLM / SGLang)")
    a.add_argument("--cloud", default="onprem", help="cloud or on-prem pool (default: onprem)")
    a.add_argument("--spot", action="store_true", help="a spot / preemptible instance")
    a.add_argument("--gpu-type", default="unknown", help="GPU model, e.g. A100-80GB (FinOps)")
    a.add_argument("--vram-gb", type=int, default=0, help="GPU memory in GiB")
    a.add_argument("--tokens-per-sec", type=int, default=0,
                   help="decode capacity (0 = what the warm-up measures, else the catalogue's)")
    a.add_argument("--tailnet-ip", help="the node's tailnet address, if any")
    a.add_argument("--reserved-org", help="org id this node is dedicated to")
    a.add_argument("--model-version", default="", help="version of the served model (see `upgrade`)")
    a.add_argument("--heartbeat-interval", type=float, help="seconds (default: the control plane's, 5)")
    a.add_argument("--metrics-interval", type=float, help="seconds (default: the control plane's, 15)")
    a.add_argument("--spot-interval", type=float, default=5.0, help="seconds between spot-notice polls")
    a.add_argument("--aws-spot-url", help=f"poll AWS IMDS spot/instance-action here (on EC2: {spot.AWS_URL})")
    a.add_argument("--gcp-spot-url", help="poll GCE's metadata preemption flag here")
    a.add_argument("--azure-spot-url", help="poll Azure scheduled events here")
    a.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to wait for in-flight requests when draining")
    a.add_argument("--restart-backoff", type=float, default=1.0, help="first restart delay in seconds")
    a.add_argument("--metrics-port", type=int, default=0, help="serve the agent's /metrics, /healthz and /readyz "
                   "here (registered, heartbeat accepted, engine healthy); 0 = off")
    a.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default: loopback)")
    a.add_argument("--tls-dir", help="directory with ca.pem, node.pem, node.key (`crosslogic pki issue-node`)")
    a.add_argument("--engine", choices=["vllm", "sglang"], help="the engine (default: found from its /metrics)")
    a.add_argument("--warmup-requests", type=int, default=4, help="concurrent streams of the warm-up benchmark "
                   "before registering (its decode rate is the capacity reported; 0 = no warm-up)")
    a.add_argument("--warmup-decode-tokens", type=int, default=32, help="tokens each warm-up stream decodes")
    a.add_argument("--model-dir", help="disk cleanup: remove other models' files from this directory "
                   "(e.g. the Hugging Face cache); the served model is kept")
    a.add_argument("--cleanup-interval", type=float, default=3600.0, help="seconds between disk cleanups")
    a.add_argument("--cleanup-min-age", type=float, default=3600.0,
                   help="never remove files modified more recently than this many seconds (downloads)")
    a.set_defaults(handler=_agent)

    u = sub.add_parser("upgrade", help="model upgrade: drain every node of MODEL not at VERSION, in each region "
                       "where a node at VERSION is already active (then stop their agents: SIGTERM drains)")
    u.add_argument("--model", required=True, help="model id")
    u.add_argument("--version", required=True, help="the version to keep")
    u.set_defaults(handler=_upgrade)

    p = sub.add_parser("pki", help="the control plane's CAs: for node agents, and internal (Envoy-to-service)")
    psub = p.add_subparsers(dest="pki_command", required=True)
    init = psub.add_parser("init", help="create the CA (once) and the NodeAgent server certificate")
    init.add_argument("--dir", required=True, help="where the CA and server certificate are written")
    init.add_argument("--host", action="append", default=None, help="server DNS name or IP (repeatable)")
    init.set_defaults(handler=_pki_init)
    issue = psub.add_parser("issue-node", help="issue a node certificate scoped to a cloud pool or one org")
    issue.add_argument("--dir", required=True, help="the CA directory")
    issue.add_argument("--name", required=True, help="the node's name (certificate common name)")
    issue.add_argument("--scope", required=True, help="pool:<cloud> or org:<org_id>")
    issue.add_argument("--out", required=True, help="directory for node.pem, node.key and ca.pem")
    issue.add_argument("--days", type=int, default=90, help="validity in days (default: 90)")
    issue.set_defaults(handler=_pki_issue)
    internal = psub.add_parser("issue-internal", help="create the internal CA (once) and (re-)issue every "
                               "certificate of the Envoy-to-service mutual TLS (docs/deploy.md)")
    internal.add_argument("--dir", required=True, help="where the internal CA and certificates are written (kept: "
                          "running it again re-issues from the same CA, which is rotation)")
    internal.add_argument("--host", action="append", default=None, help="DNS name or IP in the service "
                          "certificates (repeatable; default 127.0.0.1 and localhost)")
    internal.add_argument("--secret-dir", help="also copy what the pods need (no CA key) here, for `kubectl create "
                          "secret generic crosslogic-internal-tls --from-file=DIR`")
    internal.add_argument("--days", type=int, default=90, help="validity of the certificates in days (default: 90)")
    internal.set_defaults(handler=_pki_issue_internal)
