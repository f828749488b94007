"""On-prem sites (docs/sites.md):

    crosslogic site create --org ORG --name SITE [--listen HOST:PORT] [--no-cloud-spill]
    crosslogic site list | site revoke SITE | site rotate SITE --out DIR [--days N]
    crosslogic bundle create --site SITE --out FILE.tar.gz [--cloud-xds HOST:PORT] [--cloud-api URL]
                             [--local-ports BASE] [--days N]
    crosslogic site up BUNDLE [--dir DIR] [--ready-file PATH]      (on the site's machine; needs only the wheel)

The cloud commands run against the control plane's database and its CA (CROSSLOGIC_PKI_DIR, else the running
stack's `--state-dir`/pki); every action is in the audit log. The cloud's site endpoints default to the running
stack's (runtime.json): give the address the site reaches them at with --cloud-xds / --cloud-api.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crosslogic import pki
from crosslogic.commands.common import Ctx, Output, col, many, one
from crosslogic.runtime.state import read_runtime
from crosslogic.settings import SchedulerSettings, Settings
from crosslogic.store import sites
from crosslogic.store import tenancy as t

SITE_COLS = [col("name"), col("site_id", "ID"), col("org_name", "ORG"), col("status"),
             col("gateway_port", "PORT"), col("cloud_spill", "CLOUD_SPILL"), col("certificates", "CERTS")]
DEFAULT_LOCAL_PORTS = 9100  # site process: authz BASE, access log BASE+1, models BASE+2; Envoy admin BASE+3


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "state_dir", None) or Settings().state_dir)


def _ca(args: argparse.Namespace) -> pki.Issued:
    configured = SchedulerSettings().pki_dir or read_runtime(_state_dir(args)).get("pki_dir", "")
    directory = Path(configured) if configured else _state_dir(args) / "pki"
    if not (directory / pki.CA_KEY).exists():
        raise t.InvalidArgument(f"no CA in {directory}: set CROSSLOGIC_PKI_DIR or use the stack's --state-dir")
    return pki.load_ca(directory)


async def _create(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    host, _, port = (args.listen or "0.0.0.0:8443").rpartition(":")
    try:
        gateway_port = int(port)
    except ValueError:
        raise t.InvalidArgument(f"--listen must be HOST:PORT, not {args.listen!r}") from None
    site = await sites.create_site(conn, args.org, args.name, cloud_spill=args.cloud_spill, gateway_host=host,
                                   gateway_port=gateway_port, actor=ctx.actor)
    return one(site, SITE_COLS)


async def _list(conn, _args: argparse.Namespace, _ctx: Ctx) -> Output:
    return many(await sites.list_sites(conn), SITE_COLS)


async def _revoke(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    serials = await sites.revoke_site(conn, args.site, actor=ctx.actor)
    return Output({"site": args.site, "revoked_certificates": serials},
                  f"site {args.site} revoked with {len(serials)} certificate(s); its gateway and agents are cut off "
                  "within seconds")


async def _rotate(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    site, issued = await sites.issue_certificate(conn, args.site, _ca(args), days=args.days, actor=ctx.actor)
    out = Path(args.out)
    pki.write(out, "node", issued)
    serial = pki.serial_of(issued.cert_pem)
    return Output({"site": site.name, "serial": serial, "cert": str(out / "node.pem")},
                  f"new certificate {serial} for site {site.name} in {out} (node.pem, node.key); the previous ones "
                  "stay valid until they expire: copy these into the site's tls/ and restart `crosslogic site up`")


async def _bundle(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    from crosslogic.sites.bundle import build_bundle, write_bundle
    from crosslogic.sites.run import SiteConfig

    runtime = read_runtime(_state_dir(args))
    cloud_xds = args.cloud_xds or runtime.get("site_xds_address", "")
    cloud_api = args.cloud_api or runtime.get("site_api_url", "")
    if not cloud_xds or not cloud_api:
        raise t.InvalidArgument("no cloud site endpoints: pass --cloud-xds and --cloud-api, or use the running "
                                "stack's --state-dir")
    ca = _ca(args)
    site, issued = await sites.issue_certificate(conn, args.site, ca, days=args.days, actor=ctx.actor)
    base = args.local_ports
    config = SiteConfig(site_id=site.site_id, site_name=site.name, org_id=site.org_id, cloud_api_url=cloud_api,
                        cloud_xds_address=cloud_xds, authz_port=base, als_port=base + 1, api_port=base + 2,
                        envoy_admin_port=base + 3, gateway_port=site.gateway_port)
    write_bundle(Path(args.out), build_bundle(config, ca.cert_pem, issued))
    serial = pki.serial_of(issued.cert_pem)
    await t.audit(conn, ctx.actor, "site.bundle.create", "site", site.site_id,
                  {"name": site.name, "serial": serial, "cloud_xds": cloud_xds, "cloud_api": cloud_api})
    return Output({"site": site.name, "bundle": args.out, "serial": serial},
                  f"bundle for site {site.name} written to {args.out} (mode 0600; certificate {serial}); start it on "
                  f"the site's machine with: crosslogic site up {args.out}")


def _up(args: argparse.Namespace) -> int:
    from crosslogic.sites.up import run_site_up

    bundle = Path(args.bundle)
    directory = Path(args.dir) if args.dir else bundle.with_name(bundle.name.removesuffix(".tar.gz") + "-site")
    return run_site_up(bundle, directory, Path(args.ready_file) if args.ready_file else None, args.log_level)


def register(sub: argparse._SubParsersAction) -> None:
    from crosslogic.commands.common import db_command

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    common.add_argument("--actor", help="who to record in the audit log (default: $USER)")

    site = sub.add_parser("site", help="on-prem sites: create, list, revoke, rotate certificates, run one")
    ssub = site.add_subparsers(dest="site_action", metavar="ACTION", required=True)
    p = ssub.add_parser("create", parents=[common], help="register a site of one organisation")
    p.add_argument("--org", required=True, help="the site's organisation (name or id)")
    p.add_argument("--name", required=True, help="site name (unique)")
    p.add_argument("--listen", help="where the site gateway listens on the site's machine (default 0.0.0.0:8443)")
    p.add_argument("--cloud-spill", action=argparse.BooleanOptionalAction, default=True,
                   help="the org's requests at the site may use the cloud's shared pool when its own nodes cannot "
                        "serve (default: yes)")
    p.set_defaults(handler=db_command(_create))
    ssub.add_parser("list", parents=[common], help="every site").set_defaults(handler=db_command(_list))
    p = ssub.add_parser("revoke", parents=[common], help="revoke a site and every certificate it holds")
    p.add_argument("site", help="site name or id")
    p.set_defaults(handler=db_command(_revoke))
    p = ssub.add_parser("rotate", parents=[common], help="issue a new certificate (the old ones stay valid until "
                        "they expire)")
    p.add_argument("site", help="site name or id")
    p.add_argument("--out", required=True, help="directory to write node.pem and node.key to (created 0700)")
    p.add_argument("--days", type=float, default=90, help="validity in days (default 90)")
    p.set_defaults(handler=db_command(_rotate))
    p = ssub.add_parser("up", help="run a site from its bundle on this machine, in the foreground")
    p.add_argument("bundle", help="the bundle (`crosslogic bundle create`)")
    p.add_argument("--dir", help="where to unpack it and keep the site's state (default: next to the bundle)")
    p.add_argument("--ready-file", help="write the site's details as JSON here once its gateway is ready")
    p.set_defaults(handler=_up)

    bundle = sub.add_parser("bundle", help="site bundles: everything one site needs, nothing of other orgs")
    bsub = bundle.add_subparsers(dest="bundle_action", metavar="ACTION", required=True)
    p = bsub.add_parser("create", parents=[common], help="write a site's bundle (issues it a new certificate)")
    p.add_argument("--site", required=True, help="site name or id")
    p.add_argument("--out", required=True, help="the .tar.gz to write (mode 0600)")
    p.add_argument("--cloud-xds", help="HOST:PORT the site reaches the cloud's site xDS listener at")
    p.add_argument("--cloud-api", help="https://HOST:PORT the site reaches the cloud's site API at")
    p.add_argument("--local-ports", type=int, default=DEFAULT_LOCAL_PORTS,
                   help=f"first of four loopback ports on the site's machine (default {DEFAULT_LOCAL_PORTS})")
    p.add_argument("--days", type=float, default=90, help="certificate validity in days (default 90)")
    p.set_defaults(handler=db_command(_bundle))
