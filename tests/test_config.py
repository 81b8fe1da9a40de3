"""Settings from env vars: aliases, defaults, and one clear line for every bad value."""

from __future__ import annotations

import pytest

from corral import ConfigError, Limits, NodeSandbox
from corral.config import FLAGS, CgroupMode, ExecutorKind, load_settings, parse_executor


@pytest.mark.parametrize(
    ("alias", "kind"),
    [
        ("worker", "worker"), ("worker_thread", "worker"), ("Worker-Threads", "worker"),
        ("THREAD", "worker"), ("process", "process"), ("proc", "process"),
        ("child_process", "process"), ("Processes", "process"),
    ],
)  # fmt: skip
def test_executor_aliases(clean_env, alias, kind):
    """SANDBOX_EXECUTOR takes every alias of DESIGN §2, case-insensitively."""
    clean_env.setenv("SANDBOX_EXECUTOR", alias)
    assert load_settings().executor == ExecutorKind(kind)


def test_executor_selection_order(clean_env):
    """SANDBOX_EXECUTOR wins; else WORKER_SANDBOX_ENABLED=true picks worker; else process."""
    assert load_settings().executor is ExecutorKind.PROCESS
    clean_env.setenv("WORKER_SANDBOX_ENABLED", "true")
    assert load_settings().executor is ExecutorKind.WORKER
    clean_env.setenv("SANDBOX_EXECUTOR", "process")
    assert load_settings().executor is ExecutorKind.PROCESS


def test_defaults(clean_env):
    """Unset variables take the documented defaults; limits are off until set."""
    settings = load_settings()
    assert settings.sandbox_heartbeat_interval_ms == 500
    assert settings.sandbox_heartbeat_timeout_ms == 3000
    assert settings.sandbox_max_cpu_ms is None and settings.sandbox_max_memory_mb is None
    assert settings.egress_default == "allow"
    assert settings.cgroups is CgroupMode.AUTO
    assert str(settings.state_dir) == ".corral"


def test_limits_and_lists_are_read(clean_env):
    """Numeric limits and comma-separated lists are parsed from their variables."""
    clean_env.setenv("SANDBOX_MAX_MEMORY_MB", "128")
    clean_env.setenv("SANDBOX_MAX_CPU_MS", "250")
    clean_env.setenv("CORRAL_EGRESS_ALLOW", "*.example.com, 10.0.0.0/8")
    clean_env.setenv("CORRAL_ALLOWED_IMPORTS", "json,math")
    settings = load_settings()
    assert (settings.sandbox_max_memory_mb, settings.sandbox_max_cpu_ms) == (128, 250)
    assert settings.egress_allow == ["*.example.com", "10.0.0.0/8"]
    assert settings.allowed_imports == ["json", "math"]
    limits = Limits.from_settings(settings)
    assert (limits.max_memory_mb, limits.max_cpu_ms) == (128, 250)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SANDBOX_MAX_MEMORY_MB", "abc", "SANDBOX_MAX_MEMORY_MB='abc' is invalid"),
        ("SANDBOX_MAX_MEMORY_MB", "-5", "SANDBOX_MAX_MEMORY_MB='-5' is invalid"),
        ("SANDBOX_MAX_CPU_MS", "0", "SANDBOX_MAX_CPU_MS='0' is invalid"),
        ("SANDBOX_CPU_QUOTA_MS", "1.5", "SANDBOX_CPU_QUOTA_MS='1.5' is invalid"),
        ("SANDBOX_HEARTBEAT_INTERVAL_MS", "10", "at least 25"),
        ("SANDBOX_HEARTBEAT_TIMEOUT_MS", "600", "at least twice SANDBOX_HEARTBEAT_INTERVAL_MS"),
        ("SANDBOX_EXECUTOR", "fork", "SANDBOX_EXECUTOR='fork' is invalid"),
        ("WORKER_SANDBOX_ENABLED", "maybe", "WORKER_SANDBOX_ENABLED='maybe' is invalid"),
        ("GENERIC_EXECUTOR_ENABLED", "2", "GENERIC_EXECUTOR_ENABLED='2' is invalid"),
        ("CORRAL_EGRESS_DEFAULT", "sometimes", "CORRAL_EGRESS_DEFAULT='sometimes' is invalid"),
        ("CORRAL_CGROUPS", "maybe", "CORRAL_CGROUPS='maybe' is invalid"),
        ("CORRAL_ALLOWED_IMPORTS", "json,os", "'os' has no safe view"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_variable(clean_env, name, value, expected):
    """A bad value stops start-up with one line that names the variable and what is allowed."""
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message
    assert name.split("_")[0] in message


def test_empty_value_means_unset(clean_env):
    """An empty variable is the same as an unset one, not an error."""
    clean_env.setenv("SANDBOX_MAX_MEMORY_MB", "")
    assert load_settings().sandbox_max_memory_mb is None


def test_parse_executor_names_the_choices():
    """An unknown executor name lists the accepted ones."""
    with pytest.raises(ValueError, match="use one of: process, proc"):
        parse_executor("fork")


def test_flags_follow_env_and_reset(clean_env):
    """FLAGS reads GENERIC_EXECUTOR_ENABLED, can be overridden, and reset() restores the env."""
    from corral.config import reload_settings

    clean_env.setenv("GENERIC_EXECUTOR_ENABLED", "true")
    reload_settings()
    try:
        assert FLAGS.GENERIC_EXECUTOR_ENABLED is True
        FLAGS.GENERIC_EXECUTOR_ENABLED = False
        assert FLAGS.GENERIC_EXECUTOR_ENABLED is False
        FLAGS.reset()
        assert FLAGS.GENERIC_EXECUTOR_ENABLED is True
        with FLAGS.override(GENERIC_EXECUTOR_ENABLED=False):
            assert FLAGS.GENERIC_EXECUTOR_ENABLED is False
        assert FLAGS.GENERIC_EXECUTOR_ENABLED is True
        with pytest.raises(AttributeError, match="unknown flag"), FLAGS.override(NO_SUCH=True):
            pass
    finally:
        FLAGS.reset()
        clean_env.delenv("GENERIC_EXECUTOR_ENABLED")
        reload_settings()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_memory_mb": 0}, "max_memory_mb=0"),
        ({"max_cpu_ms": -1}, "max_cpu_ms=-1"),
        ({"max_cpu_ms": True}, "max_cpu_ms=True"),
        ({"heartbeat_interval_ms": 10}, "at least 25"),
        ({"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 150}, "at least twice"),
        ({"max_output_bytes": None}, "max_output_bytes=None"),
    ],
)
def test_bad_limits_are_config_errors(kwargs, expected):
    """Limits refuses values that are not positive integers (None only where it means no limit)."""
    with pytest.raises(ConfigError, match=expected):
        Limits(**kwargs)


def test_limits_merge_keeps_unset_fields():
    """Per-call limits override only the fields they set."""
    base = Limits(max_cpu_ms=100, max_memory_mb=64)
    merged = base.merged(Limits(max_memory_mb=None))
    assert (merged.max_cpu_ms, merged.max_memory_mb) == (100, None)


def test_unknown_executor_argument_is_a_config_error():
    """NodeSandbox(executor=...) names the bad value."""
    with pytest.raises(ConfigError, match="executor='fork' is invalid"):
        NodeSandbox(executor="fork", settings=load_settings())


def test_cgroups_required_refuses_to_degrade(clean_env):
    """CORRAL_CGROUPS=required stops start-up where the cgroups cannot be made."""
    clean_env.setenv("CORRAL_CGROUPS", "required")
    clean_env.setenv("SANDBOX_CGROUP_ROOT", "/cgroup.procs/corral")  # below a file: no mkdir
    with pytest.raises(ConfigError, match="CORRAL_CGROUPS=required, but "):
        NodeSandbox(settings=load_settings(), limits=Limits(max_memory_mb=64))
