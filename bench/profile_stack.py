"""Where one stack's CPU goes: py-spy profiles of its Python services under a closed-loop load.

    .venv/bin/python bench/profile_stack.py [--roles accounting authz] [--seconds 8] [--concurrency 16]
                                            [--out /tmp/profiles]

Starts one `crosslogic up --demo` stack (plan limits lifted, as in bench/gateway_overhead.py), runs the
one-token chat load and meanwhile `py-spy record`s each named role's process (needs `pip install py-spy`),
writing one collapsed-stack file per role and printing its top self-time frames. Not part of the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_per_request import _role, one_token_chat  # noqa: E402
from bench.gateway_overhead import start_stack, transport_env  # noqa: E402
from bench.loadgen import run_load  # noqa: E402
from crosslogic.runtime.processes import free_port  # noqa: E402


def _pids(root: int, roles: list[str]) -> dict[str, int]:
    found = {}
    for proc in psutil.Process(root).children(recursive=True):
        try:
            role = _role(proc.cmdline())
        except psutil.Error:
            continue
        if role in roles:
            found[role] = proc.pid
    return found


def top_frames(collapsed: Path, count: int = 25) -> list[tuple[str, float]]:
    """Self time per innermost frame (collapsed stacks: `a;b;c N`)."""
    selfs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        selfs[stack.split(";")[-1]] += int(n)
        total += int(n)
    return [(frame, 100 * n / total) for frame, n in selfs.most_common(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roles", nargs="+", default=["accounting", "authz"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--transport", default="http")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "crosslogic-profiles")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clp-prof-") as tmp:
        stack, info = start_stack(Path(tmp), free_port(), transport_env(args.transport))
        try:
            port, request = one_token_chat(info)
            asyncio.run(run_load("127.0.0.1", port, request, args.concurrency, 2, warmup_s=0))
            spies = {role: subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                             "--format", "raw", "--rate", "200", "--nonblocking",
                                             "-o", str(args.out / f"{role}.txt")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for role, pid in _pids(stack.pid, args.roles).items()}
            result = asyncio.run(run_load("127.0.0.1", port, request, args.concurrency, args.seconds + 1,
                                          warmup_s=0))
            for proc in spies.values():
                proc.wait(60)
        finally:
            stack.send_signal(signal.SIGTERM)
            stack.wait(60)
    print(f"{result.requests} requests, {result.rps:.0f} req/s")
    for role in spies:
        print(f"-- {role} ({args.out / (role + '.txt')}), self time")
        for frame, share in top_frames(args.out / f"{role}.txt"):
            print(f"{share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
