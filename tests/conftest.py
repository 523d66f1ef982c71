"""Test setup: CPU only, 8 fake devices, a persistent compilation cache.

The environment must be set before jax is imported anywhere, which is why it lives here.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# The tests are compile-bound (tiny models, a few steps each): LLVM's backend optimisation changes how fast
# the generated code runs, not what the HLO computes, and skipping it cut the cold-cache compile time of the
# slowest tests by ~30% (ResNet step 50 s -> 26 s). The subprocesses inherit it through the environment.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA:CPU's older elemental emitters compile these small steps faster than its fusion emitters. Cold, one fresh
# process per flag set (`python -m experiments.compile_time`): first call of a tiny ViT step 4.9 s -> 3.6 s, of a
# one-block-per-stage ResNet-18 step 7.5 s -> 5.3 s (no flags at all: 7.5 s and 12.2 s). Same HLO; the tests
# check the numbers against their references either way.
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import jax  # noqa: E402

_CACHE = os.environ.get(
    "SEQVIS_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "seqvis-jax-tests")
)
# The same cache for the subprocesses the tests start (the real command line, kill/resume, sweeps,
# multi-host): jax reads these from the environment, so a step compiled once is loaded by the next process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------- hangs
# A test that hangs must fail, with the stacks, instead of running into CI's time limit (one CI run did: no
# output for over an hour). pytest-timeout (pytest.ini: ``timeout``, signal method) fails a test stuck in
# Python (a pipe read, a wait, a lock) after ``timeout`` seconds and prints every thread's stack. A hang that
# never returns to Python (C code holding the GIL) is not reached by a signal; for it each xdist worker arms
# faulthandler's watchdog thread, which writes all stacks to a file and ends the worker a minute later; the
# controller prints the file when it sees the worker go down (xdist's own crash report has no stacks: a
# worker's stderr does not reach the terminal). scripts/test.sh runs with --max-worker-restart=0 so the
# crashed file is not re-run.
import faulthandler  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

_HANG_DIR_ENV = "SEQVIS_TEST_HANG_DIR"


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a single process): workers inherit it
        os.environ[_HANG_DIR_ENV] = tempfile.mkdtemp(prefix="seqvis-test-hangs-")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_HANG_DIR_ENV):
        shutil.rmtree(os.environ.pop(_HANG_DIR_ENV), ignore_errors=True)


def _hard_timeout(config):
    try:  # --timeout=N over pytest.ini's timeout
        option = config.getoption("timeout", None)
        seconds = float(option if option is not None else (config.getini("timeout") or 0))
    except ValueError:  # pytest-timeout not installed
        return 0.0
    return seconds + 60 if seconds > 0 else 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    worker, seconds = os.environ.get("PYTEST_XDIST_WORKER"), _hard_timeout(item.config)
    if not (worker and seconds and os.environ.get(_HANG_DIR_ENV)):
        yield
        return
    with open(os.path.join(os.environ[_HANG_DIR_ENV], f"{worker}.txt"), "w") as f:
        f.write(f"{item.nodeid} still running after {seconds:.0f} s; the stacks of every thread:\n")
        f.flush()
        faulthandler.dump_traceback_later(seconds, exit=True, file=f)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    os.remove(f.name)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # xdist, in the controller
    path = os.path.join(os.environ.get(_HANG_DIR_ENV, ""), f"{node.gateway.id}.txt")
    if error and os.path.exists(path):
        with open(path) as f:
            text = f.read()
        reporter = node.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_sep("!", f"{node.gateway.id}: a test hung")
        reporter.write_line(text)
