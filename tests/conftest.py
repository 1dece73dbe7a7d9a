import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m speechlm ARGS`` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    # Run outside the checkout so that the installed package is imported, not the source folder.
    return subprocess.run(
        [sys.executable, "-m", "speechlm", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=tempfile.gettempdir()
    )


@pytest.fixture(scope="session", autouse=True)
def _run_outside_the_checkout(tmp_path_factory):
    """Subprocesses started with ``python -m`` put the working directory first on sys.path; from the
    repo root that would import the source folder ``speechlm/`` (which lacks the mapped sub-packages)
    instead of the installed package. Tests therefore run from a temporary directory."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture
def cli():
    return run_cli
