"""Credentials at rest: the key ring, the generated key file, and `corral rotate-keys` as a
real process over the SQLite state database."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from corral import ConfigError
from corral.config import load_settings
from corral.service._connections import connections_for, store_connection
from corral.service._keys import KeyRingError, check_canary, ensure_canary, load_key_ring
from corral.service.records import SqliteRecords

SECRET = "sk-rotate-me-123456"
WORKFLOW = {"id": "wf", "nodes": [{"id": "a", "app": "github", "function": "create_issue"}]}


def test_without_keys_one_is_generated_once_into_the_state_dir(tmp_path, caplog, clean_env):
    """No CORRAL_ENCRYPTION_KEYS: a key file (mode 0600) is made and announced once; the
    next load reads the same key silently."""
    settings = load_settings(CORRAL_STATE_DIR=str(tmp_path / "state"))
    with caplog.at_level(logging.WARNING, logger="corral.keys"):
        first = load_key_ring(settings)
        second = load_key_ring(settings)
    key_file = tmp_path / "state" / "encryption.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.primary_id == second.primary_id
    announced = [r for r in caplog.records if "generated an encryption key" in r.getMessage()]
    assert len(announced) == 1
    assert key_file.read_text() not in caplog.text


def test_bad_keys_are_one_clear_error(tmp_path, clean_env):
    """A value that is not a Fernet key names CORRAL_ENCRYPTION_KEYS and how to make one."""
    with pytest.raises(ConfigError, match=r"CORRAL_ENCRYPTION_KEYS is invalid: key 2 .*Fernet"):
        load_key_ring(
            load_settings(CORRAL_ENCRYPTION_KEYS=f"{Fernet.generate_key().decode()},nope")
        )


def _rotate(state: Path, keys: str) -> dict[str, object]:
    env = {**os.environ, "CORRAL_STATE_DIR": str(state), "CORRAL_ENCRYPTION_KEYS": keys}
    env.pop("CORRAL_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "corral", "rotate-keys", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    return {"result": json.loads(done.stdout), "progress": done.stderr.splitlines()}


def test_rotate_keys_re_encrypts_everything_repeatably(tmp_path, clean_env):
    """Connections stored under key A; `rotate-keys` with "B,A" moves them (and the canary)
    to B with progress; a second run changes nothing; afterwards B alone opens them all."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    state = tmp_path / "state"
    state.mkdir()
    ring_a = load_key_ring(load_settings(CORRAL_ENCRYPTION_KEYS=old))

    async def store() -> None:
        async with SqliteRecords(state / "records.db") as records:
            await ensure_canary(records, ring_a)
            for app in ("github", "slack", "jira"):
                await store_connection(records, ring_a, app, None, {"token": SECRET}, 1.0)

    asyncio.run(store())
    first = _rotate(state, f"{new},{old}")
    ring_b = load_key_ring(load_settings(CORRAL_ENCRYPTION_KEYS=new))
    assert first["result"] == {"key_id": ring_b.primary_id, "rotated": 3, "current": 0, "raced": 0}
    assert first["progress"] == [
        "corral rotate-keys: 1/3 github",
        "corral rotate-keys: 2/3 jira",
        "corral rotate-keys: 3/3 slack",
    ]
    second = _rotate(state, f"{new},{old}")
    assert second["result"] == {"key_id": ring_b.primary_id, "rotated": 0, "current": 3, "raced": 0}

    async def read() -> None:
        async with SqliteRecords(state / "records.db") as records:
            await check_canary(records, ring_b)
            opened = await connections_for(records, ring_b, WORKFLOW)
            assert opened == {"github": {"baseUrl": None, "credentials": {"token": SECRET}}}
            assert {c["key_id"] for c in await records.list_connections()} == {ring_b.primary_id}
            with pytest.raises(KeyRingError, match="CORRAL_ENCRYPTION_KEYS"):
                await check_canary(records, ring_a)

    asyncio.run(read())
