"""The XLA:CPU scheduler workaround edits XLA_FLAGS only where and when it should."""

from __future__ import annotations

import pytest

from lowrank_optax import xla_flags


@pytest.fixture
def fresh(monkeypatch):
    """A process whose backends have not started, running an affected jaxlib."""
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda name: "0.10.2")
    return monkeypatch


def test_adds_the_flag_and_keeps_the_users_flags(fresh):
    fresh.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert xla_flags.disable_cpu_concurrency_scheduler()
    assert xla_flags.os.environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8", xla_flags.CPU_SCHEDULER_FLAG]
    assert xla_flags.disable_cpu_concurrency_scheduler()  # idempotent
    assert xla_flags.os.environ["XLA_FLAGS"].count("concurrency_optimized") == 1


def test_respects_an_explicit_choice(fresh):
    fresh.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    assert not xla_flags.disable_cpu_concurrency_scheduler()
    assert xla_flags.os.environ["XLA_FLAGS"].endswith("=true")


def test_leaves_other_jaxlib_releases_alone(fresh):
    fresh.delenv("XLA_FLAGS", raising=False)
    fresh.setattr(xla_flags.importlib.metadata, "version", lambda name: "0.11.2")
    assert not xla_flags.disable_cpu_concurrency_scheduler()
    assert "XLA_FLAGS" not in xla_flags.os.environ


def test_warns_when_the_backend_already_runs(fresh):
    fresh.delenv("XLA_FLAGS", raising=False)
    fresh.setattr(xla_flags, "_backend_started", lambda: True)
    with pytest.warns(UserWarning, match="before the first JAX computation"):
        assert not xla_flags.disable_cpu_concurrency_scheduler()
    assert "XLA_FLAGS" not in xla_flags.os.environ
