"""Helpers for the end-to-end tests (tests/test_cli_*.py): run mlx-lm's real CLIs in a
subprocess on tiny checkpoints.

The CLIs run as `python -m mlx_lm <command>` does, with one change: torch is hidden from the
child. transformers imports torch when it can (2.5 s per start); mlx-lm never needs it.
"""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

RUN_CLI = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['mlx_lm'] + sys.argv[1:]; "
    "runpy.run_module('mlx_lm', run_name='__main__')"
)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "80", "HF_HUB_OFFLINE": "1"}


def cli(*args, input=None, timeout=120, check=True, cwd=None) -> subprocess.CompletedProcess:
    """`mlx_lm <args>` in a subprocess; raises with its output when it fails and check is set.
    Its output is decoded as printed: a generated carriage return stays one (text=True would
    turn it into a newline)."""
    proc = subprocess.run(
        [sys.executable, "-c", RUN_CLI, *map(str, args)], input=None if input is None else input.encode(),
        capture_output=True, timeout=timeout, env=ENV, cwd=cwd,
    )
    proc.stdout, proc.stderr = (out.decode(errors="replace") for out in (proc.stdout, proc.stderr))
    if check and proc.returncode != 0:
        raise AssertionError(f"mlx_lm {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def generated_text(stdout: str) -> str:
    """The text between the ========== markers of `mlx_lm generate --verbose True`."""
    return stdout.split("==========\n")[1].rsplit("\n", 1)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(model, *extra, startup_timeout=60):
    """`mlx_lm server` on 127.0.0.1 and a free port; yields the base URL; always killed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI, "server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), *map(str, extra)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("server did not start in time")
                time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
