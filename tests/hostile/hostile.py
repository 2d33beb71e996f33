"""The hostile suite's shared runner: the dsv2viz command line run as a user would, bounded in time and memory.

``run_cli(args)`` runs ``dsv2viz.cli.main(args)``, what ``python -m dsv2viz.cli ARGS`` runs, in a child
process with an address-space limit (RLIMIT_AS) and a wall-clock timeout, and returns its exit status,
stdout and stderr. Importing torch costs seconds, so the children are forked from one helper process
that imported dsv2viz once (started on first use, ended at exit); each child is a fresh process
otherwise: its own memory limit, working folder, environment and, for permission tests, user.
`test_inputs.py` checks once that a real ``python -m dsv2viz.cli`` behaves the same.

Test files of other classes import what they need: ``from hostile import run_cli, assert_one_line_error``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Address space a command may use, the helper's own (torch imported, about 1 GB) included.
DEFAULT_MEMORY_BYTES = 3 * 2**30
DEFAULT_TIMEOUT = 30.0

_FORK_SERVER = r"""
import json, os, resource, sys, time, traceback
import dsv2viz.cli  # the expensive imports, once
import torch._dynamo  # imported by torch on the first model built on the meta device: 4 s on a busy machine

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the command
        code = 1
        try:
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.chdir(req["cwd"])
            os.environ.update(req["env"])
            resource.setrlimit(resource.RLIMIT_AS, (req["memory"], req["memory"]))
            if req["uid"] is not None:
                os.setgroups([])
                os.setgid(req["uid"])
                os.setuid(req["uid"])
            sys.argv = ["dsv2viz", *req["args"]]
            code = dsv2viz.cli.main(req["args"])
        except SystemExit as e:  # argparse: --help, or a bad argument
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # what `python -m dsv2viz.cli` would print
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out)
    os.close(err)
    status = None
    while time.monotonic() - start < req["timeout"]:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        status = None
        time.sleep(0.005)
    if status is None:  # still running at the deadline
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    code = None if status is None else os.waitstatus_to_exitcode(status)
    print(json.dumps({"code": code, "seconds": time.monotonic() - start}), flush=True)
"""


@dataclass(frozen=True)
class Result:
    """What a command did: exit status (None: killed at its timeout), output, and how long it ran."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float


class _ForkServer:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the hostile suite's fork server did not start: {ready!r}")
        self.scratch = Path(tempfile.mkdtemp(prefix="dsv2viz-hostile-"))
        atexit.register(self.close)

    def run(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.scratch, ignore_errors=True)


_server: _ForkServer | None = None


def run_cli(
    args: list[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    as_nobody: bool = False,
) -> Result:
    """Run ``dsv2viz ARGS`` in a child limited to `memory_bytes` of address space and `timeout` seconds.

    `env` adds environment variables; `as_nobody` runs it as user nobody when the suite runs as root (root
    reads any file, so permission tests need another user).
    """
    global _server
    if _server is None:
        _server = _ForkServer()
    out = Path(tempfile.mkstemp(dir=_server.scratch)[1])
    err = Path(tempfile.mkstemp(dir=_server.scratch)[1])
    reply = _server.run(
        {
            "args": [str(a) for a in args],
            "stdout": str(out),
            "stderr": str(err),
            "cwd": str(cwd or _server.scratch),
            "env": env or {},
            "memory": memory_bytes,
            "timeout": timeout,
            "uid": 65534 if as_nobody and os.geteuid() == 0 else None,
        }
    )
    result = Result(reply["code"], out.read_text(errors="replace"), err.read_text(errors="replace"), reply["seconds"])
    out.unlink()
    err.unlink()
    return result


def assert_one_line_error(result: Result, command: str, fragment: str, status: int = 1) -> None:
    """The command failed as every user error must: `status`, exactly one line on stderr, starting with
    ``dsv2viz <command>: error:`` and containing `fragment`, no traceback, inside its time limit."""
    assert result.code is not None, f"dsv2viz {command} ran past its timeout (a hang)"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), f"expected one line on stderr, got {result.stderr!r}"
    assert lines[0].startswith(f"dsv2viz {command}".strip() + ": error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0])
    assert result.code == status, (result.code, lines[0])
