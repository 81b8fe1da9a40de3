"""The public API is what the facades export, and nothing else."""

import corral
import corral.config
import corral.executors
import corral.runtime
import corral.sandbox


def test_all_is_exactly_the_public_names():
    """Every public name of `corral` is in __all__ and every entry of __all__ exists."""
    for module in (corral, corral.config, corral.sandbox, corral.executors, corral.runtime):
        public = {
            name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", "").startswith("corral")
            and not isinstance(value, type(corral))
        }  # fmt: skip
        assert public <= set(module.__all__), module.__name__
        assert all(hasattr(module, name) for name in module.__all__), module.__name__


def test_every_error_type_has_a_class():
    """Each stable error type string of DESIGN §5 (sandbox and runtime) maps to a
    SandboxError subclass."""
    from corral._exceptions import error_for_type

    for error_type in ("timeout", "cpu_limit", "memory_limit", "heartbeat_timeout",
                       "policy_violation", "code_error", "invalid_input", "output_limit",
                       "aborted", "sandbox_crash", "http_error", "circuit_open",
                       "not_supported", "idempotency_conflict"):  # fmt: skip
        cls = error_for_type(error_type)
        assert issubclass(cls, corral.SandboxError) and cls.type == error_type
