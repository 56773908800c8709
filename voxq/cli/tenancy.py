"""Operator commands for what isolates tenants: `voxq webhooks …` (signing secrets) and `voxq imports …`
(import grants). They talk to the database directly (VOXQ_DATABASE_URL), like `voxq keys`."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import timedelta


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `webhooks` and `imports`."""
    _register_webhooks(sub)
    _register_imports(sub)


def _register_imports(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imports = sub.add_parser(
        "imports", help="which bucket/prefix each tenant may import from (operator; uses the database)"
    )
    imports_sub = imports.add_subparsers(dest="imports_command", metavar="ACTION", required=True)
    for action, helptext, handler in (
        ("grant", "let a tenant import objects of BUCKET whose key starts with PREFIX", run_grant),
        ("revoke", "remove exactly that grant", run_revoke),
    ):
        parser = imports_sub.add_parser(action, help=helptext)
        parser.add_argument("--tenant", required=True, help="tenant name")
        parser.add_argument("--bucket", required=True)
        parser.add_argument(
            "--prefix", default="", help="key prefix, ending in / (default: empty, the whole bucket)"
        )
        parser.set_defaults(handler=handler)
    listing = imports_sub.add_parser("list", help="list grants")
    listing.add_argument("--tenant", help="only this tenant's grants")
    listing.set_defaults(handler=run_list_grants)


def _register_webhooks(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hooks = sub.add_parser("webhooks", help="tenants' webhook signing secrets (operator; uses the database)")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    rotate = hooks_sub.add_parser(
        "rotate-secret",
        help="give a tenant a new signing secret (printed once); the old one signs for --overlap-hours more",
    )
    rotate.add_argument("--tenant", required=True, help="tenant name")
    rotate.add_argument(
        "--overlap-hours",
        type=float,
        default=24.0,
        help="how long the previous secret keeps signing beside the new one (default 24, 0 = stop now)",
    )
    rotate.set_defaults(handler=run_rotate_secret)
    listing = hooks_sub.add_parser("secrets", help="list a tenant's live secrets (prefixes and dates only)")
    listing.add_argument("--tenant", required=True, help="tenant name")
    listing.set_defaults(handler=run_list_secrets)
    reencrypt = hooks_sub.add_parser(
        "reencrypt", help="encrypt every stored secret with the first VOXQ_SECRETS_KEY (after adding a key)"
    )
    reencrypt.set_defaults(handler=run_reencrypt)


def _fail(message: str) -> int:
    print(f"voxq: {message}", file=sys.stderr)
    return 1


def tenant_id_by_name(name: str) -> uuid.UUID | None:
    """The id of the tenant called `name`, or None."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Tenant

    with session_scope() as session:
        return session.scalar(select(Tenant.id).where(Tenant.name == name))


def run_rotate_secret(args: argparse.Namespace) -> int:
    """Rotate the tenant's secret and print the new one (the only time it is shown)."""
    from core import webhook_secrets
    from core.db import session_scope

    tenant_id = tenant_id_by_name(args.tenant)
    if tenant_id is None:
        return _fail(f"no tenant {args.tenant!r}")
    try:
        with session_scope() as session:
            issued = webhook_secrets.rotate(session, tenant_id, overlap=timedelta(hours=args.overlap_hours))
    except ValueError as exc:
        return _fail(str(exc))
    print(issued.secret)
    ending = (
        f"; the previous secret signs until {issued.previous_expire_at:%Y-%m-%d %H:%M:%S} UTC"
        if issued.previous_expire_at
        else ""
    )
    print(
        f"webhook secret {issued.prefix}… for tenant {args.tenant}{ending}; "
        "give it to the tenant now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def run_list_secrets(args: argparse.Namespace) -> int:
    """Print the tenant's live secrets, newest first."""
    from core import webhook_secrets
    from core.db import session_scope

    tenant_id = tenant_id_by_name(args.tenant)
    if tenant_id is None:
        return _fail(f"no tenant {args.tenant!r}")
    with session_scope() as session:
        rows = webhook_secrets.list_secrets(session, tenant_id)
    print(f"{'id':<36}  {'prefix':<12}  {'created':<19}  until")
    for row in rows:
        until = f"{row.expires_at:%Y-%m-%d %H:%M:%S}" if row.expires_at else "(current)"
        print(f"{row.id!s:<36}  {row.prefix:<12}  {row.created_at:%Y-%m-%d %H:%M:%S}  {until}")
    return 0


def run_reencrypt(args: argparse.Namespace) -> int:
    """Re-encrypt every stored secret with the first key of VOXQ_SECRETS_KEY."""
    from core import webhook_secrets
    from core.db import session_scope
    from core.errors import ConfigError

    try:
        with session_scope() as session:
            count = webhook_secrets.reencrypt(session)
    except ConfigError as exc:
        return _fail(exc.message)
    print(f"re-encrypted {count} webhook secrets", file=sys.stderr)
    return 0


def run_grant(args: argparse.Namespace) -> int:
    """Add an import grant."""
    from core import import_grants
    from core.db import session_scope
    from core.errors import ConfigError

    try:
        with session_scope() as session:
            added = import_grants.grant(session, args.tenant, args.bucket, args.prefix)
    except ConfigError as exc:
        return _fail(exc.message)
    where = f"s3://{args.bucket}/{args.prefix}"
    print(f"{args.tenant} may import {where}*" + ("" if added else " (already granted)"), file=sys.stderr)
    if args.prefix and not args.prefix.endswith("/"):
        print(
            f"note: {args.prefix!r} also matches keys like {args.prefix + 'x/…'!r}; end it with /",
            file=sys.stderr,
        )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    """Remove an import grant."""
    from core import import_grants
    from core.db import session_scope
    from core.errors import ConfigError

    try:
        with session_scope() as session:
            removed = import_grants.revoke(session, args.tenant, args.bucket, args.prefix)
    except ConfigError as exc:
        return _fail(exc.message)
    if not removed:
        return _fail(f"{args.tenant} has no grant for s3://{args.bucket}/{args.prefix}")
    print(f"revoked: {args.tenant} may no longer import s3://{args.bucket}/{args.prefix}*", file=sys.stderr)
    return 0


def run_list_grants(args: argparse.Namespace) -> int:
    """Print the grants, one per line: tenant, bucket, prefix, since."""
    from core import import_grants
    from core.db import session_scope

    with session_scope() as session:
        grants = import_grants.list_grants(session, args.tenant)
    print(f"{'tenant':<20}  {'bucket':<30}  {'prefix':<30}  since")
    for g in grants:
        print(f"{g.tenant_name:<20}  {g.bucket:<30}  {g.prefix or '(all)':<30}  {g.created_at:%Y-%m-%d}")
    return 0
