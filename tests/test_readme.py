"""The README stands alone: everything it points at is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
#: Repository paths the README names: links, and files in commands and prose.
PATH = re.compile(r"(?<![\w./-])((?:docs|examples|corral|bench|tests|\.ci)/[\w./-]*\w)")


def test_the_readme_points_at_nothing_outside_the_repository():
    """No link or path leaves the repository, and no section of a document it lacks is
    cited."""
    assert "../" not in README
    assert not re.search(r"DESIGN(\.md| §)", README)


def test_every_path_the_readme_names_exists():
    """Each file or folder the README names (links, commands, layout) is in the repository."""
    named = {match.rstrip(".") for match in PATH.findall(README)}
    assert "docs/contracts.md" in named and "examples/workflow/connections.json" in named
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert missing == []


def test_the_contracts_doc_holds_what_a_program_relies_on():
    """docs/contracts.md has the JSON shapes, error types, workflow format and metadata keys."""
    contracts = (REPO / "docs" / "contracts.md").read_text(encoding="utf-8")
    for needed in ('"ok": true', '"isolation"', "invalid_input", "idempotency_conflict",
                   "dependsOn", "fallback_reason", "circuit_state", "CORRAL_API_TOKEN",
                   "ENABLE_INLINE_WORKER", '"dedupe"'):  # fmt: skip
        assert needed in contracts, needed


def test_the_readme_names_the_hosts_system_packages():
    """The system packages a host needs are in the README, not only in .ci/run."""
    for package in ("libseccomp2", "iproute2", "redis-server"):
        assert f"`{package}`" in README, package
