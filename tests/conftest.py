import os
import subprocess
import sys
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, binary: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m speechlm ARGS`` as a user would; returns the completed process (``binary``: its output as bytes)."""
    full_env = {**os.environ, **(env or {})}
    # Run outside the checkout so that the installed package is imported, not the source folder.
    return subprocess.run(
        [sys.executable, "-m", "speechlm", *args], capture_output=True, text=not binary, env=full_env, timeout=timeout, cwd=tempfile.gettempdir()
    )


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """``speechlm ARGS`` in this process (``speechlm.cli.main``): what :func:`run_cli` returns (exit status, stdout,
    stderr; an exception the CLI does not turn into a one-line error is a traceback on stderr and status 1), without a
    new interpreter's ~3 s of imports. For tests that run the CLI many times on tiny models; the entry point itself
    (``python -m speechlm``) is what :func:`run_cli` runs. torch's thread count is restored afterwards."""
    import contextlib
    import io
    import traceback

    import torch

    from speechlm.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse: usage errors (2), --help (0)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # noqa: BLE001 - what a process would print before dying
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["speechlm", *args], code, out.getvalue(), err.getvalue())


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


@pytest.fixture
def cli_here():
    return run_cli_here


class HearsAnySound:
    """A speech detector for the tiny random models' tests, whose speech is tones: any sound is speech (the shipped
    detector, vad-en, hears a tone as no speech; tests/test_vad.py and test_shipped_models.py test it)."""

    def has_speech(self, audios: list, level: float | None = None) -> list[bool]:
        return [True] * len(audios)


def hear_any_sound(pipeline):
    """``pipeline`` with :class:`HearsAnySound` as its default speech detector (``Generation.speech_detector``)."""
    from speechlm.speech import Generation

    pipeline._detectors[Generation.speech_detector] = HearsAnySound()
    return pipeline


@pytest.fixture
def hears_any_sound():
    """:func:`hear_any_sound`, for test modules that cannot import this one (imported by path elsewhere)."""
    return hear_any_sound
