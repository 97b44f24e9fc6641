"""The package's numbers against PROTOCOL.md's tables: status codes (§7),
opcodes (§4) and limits (§8). A change in the spec that the package has not
followed fails here."""

from __future__ import annotations

import re
from typing import Dict, List

from harness import PROTOCOL_DIR
from stampede import limits
from stampede.status import Opcode, Status

SPEC = (PROTOCOL_DIR / "PROTOCOL.md").read_text()


def section(title_prefix: str) -> str:
    """The text of the ``## N.`` section whose title starts with the prefix."""
    parts = re.split(r"^## ", SPEC, flags=re.M)
    for part in parts:
        if part.startswith(title_prefix):
            return part
    raise AssertionError("no section %r in PROTOCOL.md" % title_prefix)


def table_rows(text: str) -> List[List[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_status_codes_match_section_7() -> None:
    spec: Dict[int, str] = {}
    for row in table_rows(section("7. Status codes")):
        if row[0].isdigit():
            spec[int(row[0])] = row[1].strip("`")
    ours = {int(s): s.wire_name for s in Status}
    assert ours == spec


def test_opcodes_match_section_4() -> None:
    spec: Dict[int, str] = {}
    for row in table_rows(section("4. Opcodes")):
        m = re.fullmatch(r"`0x([0-9a-f]{2})`", row[0])
        if m:
            spec[int(m.group(1), 16)] = row[1]
    ours = {int(op): op.name for op in Opcode}
    assert ours == spec


def test_limits_match_section_8() -> None:
    rows = [r for r in table_rows(section("8. Limits")) if r[0].startswith("`")]
    assert len(rows) > 20
    for row in rows:
        name = row[0].strip("`")
        assert hasattr(limits, name), "PROTOCOL.md §8 lists %s; add it to stampede/limits.py" % name
        assert getattr(limits, name) == int(row[1]), name


def test_client_defaults_match_section_9() -> None:
    """§9 "Reference defaults": 5 s request timeout, 3 s connect timeout,
    5 attempts, backoff from 5 ms doubling to 500 ms, retry-after clamp 1 to
    1000 ms."""
    text = " ".join(section("9. Client guidance").split())  # line breaks as spaces
    assert "request timeout 5 s" in text and limits.REQUEST_TIMEOUT_S == 5.0
    assert "connect timeout 3 s" in text and limits.CONNECT_TIMEOUT_S == 3.0
    assert "5 attempts" in text and limits.MAX_ATTEMPTS == 5
    assert "starts at 5 ms and doubles up to 500 ms" in text
    assert (limits.BACKOFF_INITIAL_S, limits.BACKOFF_MAX_S) == (0.005, 0.5)
    assert "1 to 1000 ms" in text and (limits.RETRY_AFTER_MIN_MS, limits.RETRY_AFTER_MAX_MS) == (1, 1000)
