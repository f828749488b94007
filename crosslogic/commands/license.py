"""Flat licences for air-gapped installs (docs/sites.md):

    crosslogic license keygen --out DIR                   (the vendor: an ed25519 signing key pair)
    crosslogic license issue --org ORG --seats N --tokens N [--days D] [--starts TIME] --signing-key FILE --out FILE
    crosslogic license verify FILE [--public-key PEM]     (exit 1 when it does not verify)
    crosslogic license show [FILE]                        (a file's contents, or every installed licence and its use)
    crosslogic license install FILE                       (checked against CROSSLOGIC_LICENSE_PUBLIC_KEY first)

`issue` and `install` are in the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from crosslogic import license as lic
from crosslogic.commands.common import Ctx, Output, db_command
from crosslogic.settings import Settings
from crosslogic.store import tenancy as t


def _public_key(args: argparse.Namespace) -> bytes:
    path = getattr(args, "public_key", None) or Settings().license_public_key
    if not path:
        raise t.InvalidArgument("no public key: pass --public-key or set CROSSLOGIC_LICENSE_PUBLIC_KEY")
    return Path(path).read_bytes()


def _read(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise t.InvalidArgument(f"cannot read the licence file {path}: {exc}") from None


def _keygen(args: argparse.Namespace) -> int:
    private, public = lic.generate_keypair(Path(args.out))
    print(f"signing key {private} (mode 0600: keep it offline); installations trust {public} "
          "(CROSSLOGIC_LICENSE_PUBLIC_KEY)")
    return 0


async def _issue(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    org = await t.get_org(conn, args.org)
    starts = datetime.fromisoformat(args.starts) if args.starts else datetime.now(UTC)
    if starts.tzinfo is None:
        starts = starts.replace(tzinfo=UTC)
    try:
        signing_key = await asyncio.to_thread(Path(args.signing_key).read_bytes)
        document = lic.issue(signing_key, org.org_id, org.name, args.seats, args.tokens,
                             starts, starts + timedelta(days=args.days))
    except (OSError, ValueError) as exc:
        raise t.InvalidArgument(str(exc)) from None
    await asyncio.to_thread(Path(args.out).write_text, json.dumps(document, indent=2))
    body = document["license"]
    await t.audit(conn, ctx.actor, "license.issue", "license", body["license_id"],
                  {k: body[k] for k in ("org_id", "seats", "tokens", "valid_from", "expires_at")})
    return Output(body, f"licence {body['license_id']} for {org.name}: {args.seats} seats, {args.tokens} tokens, "
                        f"until {body['expires_at']} -> {args.out}")


def _verify(args: argparse.Namespace) -> int:
    try:
        licence = lic.verify(_read(args.file), _public_key(args))
    except (lic.LicenseInvalid, t.InvalidArgument, OSError) as exc:
        print(f"crosslogic: licence INVALID: {exc}", file=sys.stderr)
        return 1
    expired = licence.expires <= datetime.now(UTC)
    print(json.dumps({"valid": True, "expired": expired, **licence.__dict__}) if args.json else
          f"licence {licence.license_id} for {licence.org_name} verifies"
          f"{' (EXPIRED ' + licence.expires_at + ')' if expired else ''}")
    return 0


async def _installed(conn, _args: argparse.Namespace, _ctx: Ctx) -> Output:
    rows = await conn.fetch("SELECT l.license_id, o.name AS org, l.body::text AS body, l.installed_at, "
                            "(SELECT COALESCE(sum(total_tokens), 0)::bigint FROM usage_records u WHERE u.org_id = "
                            "l.org_id AND u.occurred_at >= (l.body->'license'->>'valid_from')::timestamptz) AS used "
                            "FROM licenses l JOIN orgs o USING (org_id) ORDER BY l.installed_at")
    out = [{**json.loads(r["body"])["license"], "used_tokens": r["used"], "installed_at": r["installed_at"].isoformat()}
           for r in rows]
    text = "\n".join(f"{o['license_id']}  {o['org_name']}  seats {o['seats']}  tokens {o['used_tokens']}/{o['tokens']}"
                     f"  until {o['expires_at']}" for o in out) or "(none)"
    return Output(out, text)


def _show(args: argparse.Namespace) -> int:
    if args.file is None:
        return db_command(_installed)(args)
    document = _read(args.file)
    print(json.dumps(document["license"], indent=2))
    return 0


async def _install(conn, args: argparse.Namespace, ctx: Ctx) -> Output:
    document = _read(args.file)
    try:
        licence = lic.verify(document, _public_key(args))
    except lic.LicenseInvalid as exc:
        raise t.InvalidArgument(f"refused, nothing installed: {exc}") from None
    async with t.transaction(conn) as tx:
        await tx.execute("INSERT INTO licenses (license_id, org_id, body) VALUES ($1, $2, $3::jsonb) "
                         "ON CONFLICT (license_id) DO NOTHING", licence.license_id, uuid.UUID(licence.org_id),
                         json.dumps(document))
        await t.audit(tx, ctx.actor, "license.install", "license", licence.license_id,
                      {"org_id": licence.org_id, "seats": licence.seats, "tokens": licence.tokens,
                       "expires_at": licence.expires_at})
    return Output(licence.__dict__, f"licence {licence.license_id} installed for {licence.org_name}")


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    common.add_argument("--actor", help="who to record in the audit log (default: $USER)")
    p = sub.add_parser("license", help="flat licences of air-gapped installs: issue, verify, show, install")
    lsub = p.add_subparsers(dest="license_action", metavar="ACTION", required=True)
    k = lsub.add_parser("keygen", help="an ed25519 signing key pair (the vendor's)")
    k.add_argument("--out", required=True, help="directory for license-signing.key (0600) and .pub")
    k.set_defaults(handler=_keygen)
    i = lsub.add_parser("issue", parents=[common], help="sign a licence for one org")
    i.add_argument("--org", required=True, help="org name or id")
    i.add_argument("--seats", type=int, required=True, help="active API keys the org may hold")
    i.add_argument("--tokens", type=int, required=True, help="token allowance over the licence's validity")
    i.add_argument("--days", type=float, default=365, help="validity in days (default 365)")
    i.add_argument("--starts", help="ISO 8601 start (default now)")
    i.add_argument("--signing-key", required=True, help="the ed25519 private key (license keygen)")
    i.add_argument("--out", required=True, help="the licence file to write")
    i.set_defaults(handler=db_command(_issue))
    v = lsub.add_parser("verify", help="check a licence file's signature")
    v.add_argument("file", help="the licence file")
    v.add_argument("--public-key", help="PEM (default CROSSLOGIC_LICENSE_PUBLIC_KEY)")
    v.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    v.set_defaults(handler=_verify)
    s = lsub.add_parser("show", parents=[common], help="a licence file's contents, or the installed licences")
    s.add_argument("file", nargs="?", help="a licence file (default: list the installed licences)")
    s.set_defaults(handler=_show)
    n = lsub.add_parser("install", parents=[common], help="install a licence (verified first)")
    n.add_argument("file", help="the licence file (`license issue`)")
    n.add_argument("--public-key", help="PEM (default CROSSLOGIC_LICENSE_PUBLIC_KEY)")
    n.set_defaults(handler=db_command(_install))
