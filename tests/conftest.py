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


@pytest.fixture
def cli():
    return run_cli
