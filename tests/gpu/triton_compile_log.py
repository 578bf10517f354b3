"""pytest plugin (``-p triton_compile_log``): log every Triton compile of the test process, hit or miss."""
from fastseg.bench.triton_cache import install_listener


def pytest_configure(config):
    install_listener("pytest")
