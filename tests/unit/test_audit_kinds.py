"""Every audit record kind the code appends is in the registry (gateway.audit.kinds)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gateway.audit.kinds import KINDS, is_kind

ROOT = Path(__file__).resolve().parents[2]
KIND = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*\.[a-z0-9]+(_[a-z0-9]+)*$")
# Calls whose first argument (or ``kind=``) is the kind of the row they append.
WRITERS = {"append", "_append", "_audit", "audit", "_record", "AuditRecord", "RefusalLog"}


def _written_kinds() -> dict[str, str]:
    """Return {kind: where} for every kind literal handed to a writer, or bound to a ``*_KIND`` name."""
    found: dict[str, str] = {}
    for path in sorted([*(ROOT / "gateway").rglob("*.py"), *(ROOT / "protocols").rglob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            candidates: list[ast.expr] = []
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in WRITERS:
                    candidates += node.args[:2] if name == "RefusalLog" else node.args[:1]
                    candidates += [k.value for k in node.keywords if k.arg == "kind"]
                if isinstance(node.func, ast.Attribute) and node.func.attr == "_audit":
                    for arg in node.args[:1]:  # ``"a" if ok else "b"``
                        if isinstance(arg, ast.IfExp):
                            candidates += [arg.body, arg.orelse]
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_KIND") for t in node.targets
            ):
                candidates.append(node.value)
            for c in candidates:
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and KIND.match(c.value):
                    found.setdefault(c.value, f"{path.relative_to(ROOT)}:{c.lineno}")
    return found


def test_every_kind_written_is_registered() -> None:
    """A kind appended anywhere without a line in the registry fails here, naming where it is written."""
    missing = {k: where for k, where in _written_kinds().items() if not is_kind(k)}
    assert not missing, f"register these in gateway/audit/kinds.py: {missing}"


def test_the_registry_reads_well() -> None:
    """Each kind is `area.what`, in lower case, with a one-line meaning."""
    for kind, meaning in KINDS.items():
        assert KIND.match(kind), kind
        assert meaning and "\n" not in meaning, kind
    assert len(_written_kinds()) >= 40  # the scan finds the writers (a broken scan would pass vacuously)
