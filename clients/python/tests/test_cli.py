"""``python -m stampede`` against a real server, as a person would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Tuple

from harness import ADMIN, CHECKOUT, PACKAGE_DIR, ServerProcess, run
from stampede import AsyncClient, Status


def cli(args: List[str], token: str = CHECKOUT) -> Tuple[int, str, str]:
    env = dict(os.environ, STAMPEDE_TOKEN=token, PYTHONPATH=str(PACKAGE_DIR))
    p = subprocess.run(
        [sys.executable, "-m", "stampede", *args], capture_output=True, text=True, env=env, timeout=60
    )
    return p.returncode, p.stdout, p.stderr


def cli_json(server: ServerProcess, *args: str, token: str = CHECKOUT) -> Dict[str, object]:
    code, out, err = cli(["--server", server.addr, "--json", *args], token)
    assert code == 0, (code, out, err)
    return json.loads(out)  # type: ignore[no-any-return]


def test_cli_ping_status_reserve_confirm(server: ServerProcess) -> None:
    async def setup() -> None:
        async with AsyncClient(server.addr, ADMIN) as admin:
            assert (await admin.create_sale(31, 2, 1, 600_000)).status is Status.OK

    run(setup())
    ping = cli_json(server, "ping")
    assert ping["status"] == "ok" and int(ping["server_time_ms"]) > 0  # type: ignore[call-overload]

    held = cli_json(server, "reserve", "--sku", "31", "--user", "7")
    assert held["status"] == "reserved" and held["code"] == 1 and len(str(held["id"])) == 32
    again = cli_json(server, "reserve", "--sku", "31", "--user", "7", "--id", str(held["id"]))
    assert again == held, "a retry with the id answers the original outcome"
    done = cli_json(server, "confirm", "--id", str(held["id"]), "--payment-ref", "pi_cli")
    assert done["status"] == "confirmed" and "confirmed_at_ms" in done

    other = cli_json(server, "reserve", "--sku", "31", "--user", "8")
    assert cli_json(server, "release", "--id", str(other["id"]))["status"] == "released"

    status = cli_json(server, "status", "--sku", "31")
    assert (status["total"], status["available"], status["reserved"], status["sold"]) == (2, 1, 0, 1)

    # Human output, like stampede-ctl's.
    code, out, _ = cli(["--server", server.addr, "status", "--sku", "31"])
    assert code == 0 and out.startswith("ok: total 2 available 1 reserved 0 sold 1"), out
    code, out, _ = cli(["--server", server.addr, "reserve", "--sku", "31", "--user", "9"])
    assert code == 0 and out.startswith("reserved expires_at_ms="), out
    code, out, _ = cli(["--server", server.addr, "reserve", "--sku", "31", "--user", "10"])
    assert code == 0 and out.startswith("sold_out"), "an outcome is an answer: exit 0"


def test_cli_errors(server: ServerProcess) -> None:
    code, out, err = cli(["--server", server.addr, "--json", "ping"], token="wrong")
    assert code == 1 and json.loads(out)["status"] == "error" and "auth_failed" in err
    code, _, err = cli(["--server", server.addr, "confirm", "--id", "0"])
    assert code == 2 and "reserved" in err, "usage errors exit 2"
    code, _, err = cli(["--server", "127.0.0.1:1", "--timeout", "1", "ping"])
    assert code == 1 and "cannot connect" in err


def test_cli_reserve_at_locations_and_status_table(server: ServerProcess) -> None:
    async def setup() -> None:
        async with AsyncClient(server.addr, ADMIN) as admin:
            created = await admin.create_sale(32, 10, 5, 600_000, locations={1: 4, 3: 6}, regions={2: [3, 1]})
            assert created.status is Status.OK

    run(setup())
    first = cli_json(server, "reserve", "--sku", "32", "--user", "7")
    assert (first["status"], first["location"]) == ("reserved", 1), "the default order"
    listed = cli_json(server, "reserve", "--sku", "32", "--user", "8", "--location", "3", "--location", "1")
    assert (listed["status"], listed["location"]) == ("reserved", 3)
    by_region = cli_json(server, "reserve", "--sku", "32", "--user", "9", "--region", "2")
    assert (by_region["status"], by_region["location"]) == ("reserved", 3)
    unknown = cli_json(server, "reserve", "--sku", "32", "--user", "9", "--location", "8")
    assert unknown["status"] == "unknown_location" and "location" not in unknown

    status = cli_json(server, "status", "--sku", "32")
    assert status["locations"] == [
        {"location": 1, "total": 4, "available": 3, "reserved": 1, "sold": 0},
        {"location": 3, "total": 6, "available": 4, "reserved": 2, "sold": 0},
    ]
    assert status["regions"] == [{"region": 2, "order": [3, 1]}]
    code, out, _ = cli(["--server", server.addr, "status", "--sku", "32"])
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("ok: total 10 available 7 reserved 3 sold 0"), out
    assert lines[1].split() == ["location", "total", "available", "reserved", "sold"]
    assert [line.split() for line in lines[2:4]] == [["1", "4", "3", "1", "0"], ["3", "6", "4", "2", "0"]]
    assert lines[4] == "region 2: [3,1]"

    code, _, err = cli(["--server", server.addr, "reserve", "--sku", "32", "--user", "1", "--location", "1", "--region", "2"])
    assert code == 2 and "not allowed with" in err, "a region or locations, not both: a usage error"


def test_human_status_lists_locations_only_for_a_sale_with_several() -> None:
    """Offline: the one-line form, plus stampede-ctl's table of locations
    and regions when the sale has any but the implicit location 0."""
    from stampede.cli import _human

    base = {
        "status": "ok",
        "total": 10,
        "available": 7,
        "reserved": 3,
        "sold": 0,
        "reservations": 3,
        "limit_per_user": 5,
        "ttl_ms": 600000,
        "hot": False,
        "paused": False,
        "pinned": False,
    }
    single = dict(base, locations=[{"location": 0, "total": 10, "available": 7, "reserved": 3, "sold": 0}])
    assert _human(single) == _human(base) and "\n" not in _human(base)
    several = dict(
        base,
        locations=[
            {"location": 1, "total": 4, "available": 3, "reserved": 1, "sold": 0},
            {"location": 3, "total": 6, "available": 4, "reserved": 2, "sold": 0},
        ],
        regions=[{"region": 2, "order": [3, 1]}],
    )
    lines = _human(several).splitlines()
    assert lines[0] == _human(base)
    assert lines[1:] == [
        "  location        total    available     reserved         sold",
        "         1            4            3            1            0",
        "         3            6            4            2            0",
        "region 2: [3,1]",
    ]
    assert _human({"status": "reserved", "code": 1, "expires_at_ms": 5, "id": "ab", "location": 3}) == (
        "reserved expires_at_ms=5 id=ab location=3"
    )
