"""The code environment's harness protocol, run directly (no sandbox needed): the driver records
only the worker's replies to its own requests and ends exactly as the worker ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vhack.grpo.envs.code_grading import harness_program, parse_hidden_output, parse_markers

# move the channel to fd 3, then exec main.py as the sandbox would
_ON_FD_3 = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.execv(sys.executable, [sys.executable, '-I', '-S', 'main.py'])\n"
)


def run_harness(tmp_path, kind: str, solution: str, stdin: bytes = b"", prelude: str = ""):
    """(returncode, channel text, stderr) of the harness run as the sandbox runs it: main.py
    under `python -I -S`, solution.py beside it, the channel on fd 3."""
    (tmp_path / "main.py").write_text(prelude + harness_program(kind))
    (tmp_path / "solution.py").write_text(textwrap.dedent(solution))
    channel_r, channel_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _ON_FD_3, str(channel_w)],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(channel_w,),
    )
    os.close(channel_w)
    _, err = proc.communicate(stdin, timeout=20)
    with os.fdopen(channel_r, "rb") as f:
        channel = f.read().decode()
    return proc.returncode, channel, err.decode()


HONEST = """
class Solution:
    def double(self, x):
        return 2 * x

def run_tests():
    assert Solution().double(2) == 4
"""


def hidden_job(*cases) -> bytes:
    return (json.dumps({"method": "double", "cases": [list(c) for c in cases]}) + "\n").encode()


def test_proxy_records_each_step_and_the_real_exit(tmp_path):
    rc, channel, _ = run_harness(tmp_path, "proxy", HONEST)
    assert rc == 0 and parse_markers(channel) == {"loaded", "started", "finished"}


@pytest.mark.parametrize(
    "body, rc, marks",
    [
        ("raise SystemExit(7)", 7, {"loaded", "started", "exit_called"}),
        ("import os; os._exit(5)", 5, {"loaded", "started"}),
        ("assert False", 1, {"loaded", "started", "raised"}),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", -signal.SIGSEGV, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGXCPU)", -signal.SIGXCPU, None),
    ],
)
def test_driver_ends_as_the_worker_ended(tmp_path, body, rc, marks):
    """The sandbox classifies the run from the driver's wait status: it must be the worker's."""
    solution = f"class Solution:\n    pass\n\ndef run_tests():\n    {body}\n"
    got_rc, channel, _ = run_harness(tmp_path, "proxy", solution)
    assert got_rc == rc
    assert parse_markers(channel) == (marks or {"loaded", "started"})


def test_a_crash_at_load_records_nothing(tmp_path):
    rc, channel, err = run_harness(tmp_path, "proxy", "raise RuntimeError('at load')\n")
    assert rc == 1 and parse_markers(channel) == set() and "RuntimeError: at load" in err


def test_missing_run_tests_exits_with_the_reason(tmp_path):
    rc, channel, err = run_harness(tmp_path, "proxy", "x = 1\n")
    assert rc == 1 and parse_markers(channel) == {"loaded"}
    assert "run_tests() is not defined" in err


def test_hidden_cases_one_at_a_time_then_the_mutant(tmp_path):
    rc, channel, _ = run_harness(tmp_path, "hidden", HONEST, hidden_job((1,), (2,), ("a",)))
    assert rc == 0
    loaded, results, mutant = parse_hidden_output(channel, 3)
    assert loaded and mutant == "killed"
    assert [results[i]["value"] for i in range(3)] == [2, 4, "aa"]


def test_worker_ending_during_a_case(tmp_path):
    solution = """
    import os
    class Solution:
        def double(self, x):
            if x == 2:
                os._exit(3)
            return 2 * x
    """
    rc, channel, _ = run_harness(tmp_path, "hidden", solution, hidden_job((1,), (2,), (3,)))
    assert rc == 3
    _, results, mutant = parse_hidden_output(channel, 3)
    assert results[0]["ok"] and not results[1]["ok"] and 2 not in results and mutant is None
    assert "ended" in results[1]["error"]


@pytest.mark.parametrize(
    "forgery",
    [
        "os.write(fd, b'x' * (2 << 20))",  # a reply over the 1 MiB line cap
        "os.write(fd, b'no nonce here\\n')",
        "os.write(fd, b'0' * 32 + b' loaded\\n')",  # a guessed nonce
    ],
)
def test_replies_nobody_asked_for_are_violations(tmp_path, forgery):
    """Written at load, before the driver asked anything: the driver kills the worker and
    records a violation, whatever the bytes."""
    solution = f"""
    import os
    for fd in range(4, 32):
        try:
            {forgery}
        except OSError:
            pass
    """
    rc, channel, err = run_harness(tmp_path, "proxy", solution)
    assert rc == 1 and "harness:" in err
    with pytest.raises(ValueError, match="harness protocol"):
        parse_markers(channel)


def test_driver_ignores_sigint_and_works_without_pidfd(tmp_path):
    """SIGINT (Python's one handled signal) from the graded code does not stop the driver, and
    a kernel without pidfd_open (Linux < 5.3) is served by polling."""
    solution = HONEST + "import os, signal\nos.kill(os.getppid(), signal.SIGINT)\n"
    prelude = "import os\ndel os.pidfd_open\n"
    rc, channel, _ = run_harness(tmp_path, "hidden", solution, hidden_job((5,)), prelude)
    assert rc == 0
    loaded, results, mutant = parse_hidden_output(channel, 1)
    assert loaded and results[0]["value"] == 10 and mutant == "killed"


def test_deleting_run_tests_does_not_hide_it_from_the_mutant(tmp_path):
    """The mutant runs the run_tests() that loading defined: a method that deletes it from the
    module's globals no longer turns the mutant check into "not run"."""
    solution = """
    class Solution:
        def double(self, x):
            globals().pop("run_tests", None)
            return 2 * x

    def run_tests():
        Solution().double(1)
    """
    rc, channel, _ = run_harness(tmp_path, "hidden", solution, hidden_job((1,)))
    assert rc == 0
    _, results, mutant = parse_hidden_output(channel, 1)
    assert results[0]["value"] == 2 and mutant == "survived"
