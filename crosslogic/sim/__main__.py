"""Run one simulated vLLM (or, with --engine sglang, SGLang) node:
``python -m crosslogic.sim --port 8001 --model llama-3-8b``.

SIGTERM or SIGINT stops accepting connections and lets in-flight requests finish (``--shutdown-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from crosslogic.sim.server import SimulatorConfig, serve


def parse_args(argv: list[str] | None = None) -> tuple[SimulatorConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m crosslogic.sim", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", dest="models",
                   help="served model name (repeat for aliases; the first is the canonical name)")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-sec", type=float, default=0.0, help="0 = no delay between tokens")
    p.add_argument("--completion-tokens", type=int, default=16,
                   help="tokens written when a request sets no max_tokens")
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--node-name", default="sim-0")
    p.add_argument("--shutdown-timeout", type=float, default=10.0)
    p.add_argument("--engine", choices=["vllm", "sglang"], default="vllm",
                   help="which engine's API, metrics and quirks to present (default: vllm)")
    p.add_argument("--kv-cache-tokens", type=int, default=131072, help="KV-cache capacity in tokens")
    args = p.parse_args(argv)
    config = SimulatorConfig(
        models=tuple(args.models or ["llama-3-8b"]),
        default_completion_tokens=args.completion_tokens,
        ttft_ms=args.ttft_ms,
        tokens_per_sec=args.tokens_per_sec,
        embedding_dim=args.embedding_dim,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        node_name=args.node_name,
        engine=args.engine,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    return config, args


async def _main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, args.host, args.port, stop, args.shutdown_timeout)


def main(argv: list[str] | None = None) -> None:
    from crosslogic.runtime import airgap

    airgap.install_from_environment()  # `crosslogic up --airgap --demo` starts simulators too
    asyncio.run(_main(argv))


if __name__ == "__main__":
    main()
