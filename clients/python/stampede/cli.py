"""``python -m stampede``: a few ``stampede-ctl`` commands for quick checks.

Commands: ``ping``, ``status``, ``reserve``, ``confirm``, ``release`` (and
``cluster``), with ``stampede-ctl``'s flags and output: one line for
people (plus a table of locations for a sale with several), or one JSON
object with ``--json``. ``reserve`` takes ``--location`` (repeated, in
order of preference) or ``--region``, and says where the units are held. The token comes from
``$STAMPEDE_TOKEN`` only, so it never shows in ``ps``.

Exit status, as ``stampede-ctl``'s: 0 whenever the server answered
(whatever the outcome: ``sold_out`` is an answer), 1 on connection, auth
or protocol errors, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from typing import Any, Dict, List, Optional

from . import limits
from .errors import StampedeError
from .ids import format_reservation_id, new_reservation_id, parse_reservation_id
from .messages import Outcome
from .status import Status
from .sync import Client


def _id(text: str) -> int:
    try:
        return parse_reservation_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stampede", description="Talk to a stampede server")
    p.add_argument(
        "--server",
        default=limits.DEFAULT_ADDRESS,
        help="server address; for a cluster every node's, comma-separated (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting the CA certificate(s) in this file")
    p.add_argument("--timeout", type=float, default=limits.REQUEST_TIMEOUT_S, help="request timeout, seconds")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="check the server answers (prints its clock)")
    s = sub.add_parser("status", help="counters of a sale")
    s.add_argument("--sku", type=int, required=True)
    r = sub.add_parser("reserve", help="hold units for a user; prints the reservation id")
    r.add_argument("--sku", type=int, required=True)
    r.add_argument("--user", type=int, required=True)
    r.add_argument("--qty", type=int, default=1)
    r.add_argument("--id", type=_id, help="reservation id in hex (default: a fresh random id); reuse it to retry")
    where = r.add_mutually_exclusive_group()
    where.add_argument(
        "--location",
        dest="locations",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="a preferred location (warehouse), in order: repeat the flag; the units come from the first that has them all",
    )
    where.add_argument("--region", type=int, help="the shopper's region (the sale maps it to an order of locations)")
    c = sub.add_parser("confirm", help="turn a reservation into a sale")
    c.add_argument("--id", type=_id, required=True)
    c.add_argument("--payment-ref", default="")
    rel = sub.add_parser("release", help="give a reservation's units back")
    rel.add_argument("--id", type=_id, required=True)
    sub.add_parser("cluster", help="who leads, as the node asked knows it")
    return p


def outcome_json(o: Outcome) -> Dict[str, Any]:
    """The JSON ``stampede-ctl`` prints for an outcome."""
    v: Dict[str, Any] = {"status": o.status.wire_name, "code": int(o.status)}
    if o.status is Status.RESERVED:
        v["expires_at_ms"] = o.detail
    elif o.status is Status.CONFIRMED:
        v["confirmed_at_ms"] = o.detail
    elif o.status is Status.EXPIRED and o.detail:
        v["expired_at_ms"] = o.detail
    elif o.status in (Status.BUSY, Status.RATE_LIMITED):
        v["retry_after_ms"] = o.detail
    elif o.status is Status.OK and o.detail:
        v["detail"] = o.detail
    return v


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    tls: Optional[ssl.SSLContext] = None
    if args.tls_ca:
        tls = ssl.create_default_context(cafile=args.tls_ca)
    token = os.environ.get(limits.TOKEN_ENV, "")
    with Client(args.server, token, connections=1, ssl=tls, request_timeout=args.timeout) as client:
        if args.command == "ping":
            o = client.ping()
            return {"status": o.status.wire_name, "server_time_ms": o.detail}
        if args.command == "status":
            s = client.status(args.sku)
            v: Dict[str, Any] = {
                "status": s.status.wire_name,
                "sku": args.sku,
                "total": s.total,
                "available": s.available,
                "reserved": s.reserved,
                "sold": s.sold,
                "reservations": s.reservations,
                "limit_per_user": s.limit_per_user,
                "ttl_ms": s.ttl_ms,
                "hot": s.hot,
                "paused": s.paused,
                "placement": "dedicated" if s.hot else "pool",
                "pinned": s.pinned,
            }
            if s.status is Status.OK:
                loc = client.locations(args.sku)
                v["locations"] = [
                    {"location": x.location, "total": x.total, "available": x.available, "reserved": x.reserved, "sold": x.sold}
                    for x in loc.locations
                ]
                if loc.regions:
                    v["regions"] = [{"region": r, "order": order} for r, order in loc.regions]
            if s.queue is not None:
                q = s.queue
                v["queue"] = {
                    "waiting": q.waiting,
                    "admit_rate_per_s": q.admit_rate_per_s,
                    "admitted_outstanding": q.admitted_outstanding,
                    "admitted_total": q.admitted_total,
                    "oldest_wait_ms": q.oldest_wait_ms,
                }
            return v
        if args.command == "reserve":
            rid = args.id if args.id is not None else new_reservation_id()
            # RESERVE_AT, as stampede-ctl sends: with neither flag it is the
            # sale's default order (what RESERVE does), and the reply says
            # where the units are held.
            o = client.reserve_at(args.sku, args.user, args.qty, rid, region=args.region, locations=args.locations)
            v = outcome_json(o)
            v["id"] = format_reservation_id(rid)
            if o.status is Status.RESERVED:
                v["location"] = o.location
            return v
        if args.command == "confirm":
            return outcome_json(client.confirm(args.id, args.payment_ref.encode("utf-8")))
        if args.command == "release":
            return outcome_json(client.release(args.id))
        if args.command == "cluster":
            c = client.cluster()
            return {
                "status": c.status.wire_name,
                "term": c.term,
                "role": c.role.name.lower(),
                "leader": c.leader_addr,
                "nodes": [
                    {
                        "id": n.id,
                        "addr": n.addr,
                        "role": n.role.name.lower(),
                        "in_sync_set": n.in_sync_set,
                        "streaming": n.streaming,
                        "durable_lsn": n.durable_lsn,
                        "applied_lsn": n.applied_lsn,
                    }
                    for n in c.nodes
                ],
            }
    raise AssertionError("unknown command %r" % args.command)


def _human(v: Dict[str, Any]) -> str:
    """``stampede-ctl``'s one-line form."""
    status = v.get("status", "?")
    if "total" in v and "available" in v:
        line = "%s: total %s available %s reserved %s sold %s (reservations %s, limit %s/user, ttl %s ms%s%s%s)" % (
            status,
            v["total"],
            v["available"],
            v["reserved"],
            v["sold"],
            v["reservations"],
            v["limit_per_user"],
            v["ttl_ms"],
            ", hot" if v.get("hot") else "",
            ", pinned" if v.get("pinned") else "",
            ", paused" if v.get("paused") else "",
        )
        # One location (id 0) is a sale without locations: nothing more to say.
        locations = v.get("locations") or []
        if len(locations) > 1 or (locations and locations[0]["location"] != 0):
            line += "\n%10s %12s %12s %12s %12s" % ("location", "total", "available", "reserved", "sold")
            for x in locations:
                line += "\n%10s %12s %12s %12s %12s" % (x["location"], x["total"], x["available"], x["reserved"], x["sold"])
            for r in v.get("regions") or []:
                line += "\nregion %s: %s" % (r["region"], json.dumps(r["order"], separators=(",", ":")))
        q = v.get("queue")
        if q:
            line += "\nqueue: %s waiting, %s admitted now, %s admitted in all, %s/s, oldest wait %s ms" % (
                q["waiting"],
                q["admitted_outstanding"],
                q["admitted_total"],
                q["admit_rate_per_s"],
                q["oldest_wait_ms"],
            )
        return line
    parts: List[str] = [str(status)]
    for key, value in v.items():
        if key not in ("status", "code"):
            parts.append("%s=%s" % (key, value if isinstance(value, str) else json.dumps(value)))
    return " ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        v = _run(args)
    except (StampedeError, OSError) as e:
        if args.json:
            print(json.dumps({"status": "error", "error": str(e)}))
        print("stampede: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(v) if args.json else _human(v))
    return 0
