"""The wire contract has one home (crosslogic/contract.py): the Lua filter, the bootstrap and the services take
its names from there instead of repeating them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crosslogic import contract
from crosslogic.runtime.envoy import BootstrapParams, envoy_asset, render_bootstrap
from crosslogic.xds.resources import usage_filter_source

PACKAGE = Path(contract.__file__).parent


def _contract_values() -> set[str]:
    values = {contract.USAGE_NAMESPACE, contract.AUTHZ_NAMESPACE, contract.RELEASE_CLUSTER, contract.RELEASE_PATH,
              *(h.value for h in contract.Header),
              *(m.value for m in contract.UsageMode if m is not contract.UsageMode.JSON)}  # "json": a common word
    return values


def test_the_lua_filter_spells_no_contract_value_itself():
    source = envoy_asset("lua/usage.lua")
    code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())  # comments may name them
    repeated = sorted(v for v in _contract_values() if f'"{v}"' in code)
    assert not repeated, f"usage.lua repeats {repeated}: take them from contract.lua_constants()"


def test_the_lua_filter_is_sent_with_every_constant_it_uses():
    source = usage_filter_source()
    defined = set(re.findall(r"^local (\w+) = ", contract.lua_constants(), re.M))
    used_upper = set(re.findall(r"\b([A-Z][A-Z_]+)\b", envoy_asset("lua/usage.lua")))
    assert {"NS", "AUTHZ_NS", "USAGE_MODE_HEADER", "LEASE_KEY", "MODE_JSON"} <= defined
    assert source.startswith(contract.lua_constants())
    assert defined & used_upper == defined - {"MODE_SSE_KEEP"}, "a contract constant the filter never uses"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_bootstrap_names_the_contract_clusters(transport):
    params = BootstrapParams(node_id="g", admin_port=1, xds_port=2, authz_port=3, accounting_port=4, api_port=5,
                             ratelimit_port=6, release_port=7, authz_transport=transport)
    static = render_bootstrap(params).split("static_resources:", 1)[1]
    names = set(re.findall(r"^  - name: (\S+)$", static, re.M))
    assert names == {contract.XDS_CLUSTER, contract.AUTHZ_CLUSTER, contract.ACCOUNTING_CLUSTER, contract.API_CLUSTER,
                     contract.RATELIMIT_CLUSTER, contract.RELEASE_CLUSTER}


def test_no_module_spells_an_internal_header_or_namespace_outside_the_contract():
    pattern = re.compile(r"[\"'](x-clp-[a-z-]+|crosslogic\.usage|envoy\.filters\.http\.ext_authz)[\"']")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "contract.py" or "sim" in path.parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for match in pattern.finditer(code):
                # The ext_authz filter's own name is the same string as its metadata namespace: allowed where a
                # filter is named ("name": ...), never as a namespace.
                if match.group(1) == contract.AUTHZ_NAMESPACE and ('"name"' in code or "{\"envoy.filters" in code):
                    continue
                offenders.append(f"{path.relative_to(PACKAGE)}:{n}: {match.group(1)}")
    assert not offenders, offenders
