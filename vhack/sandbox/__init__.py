"""Run untrusted Python programs in a sandbox (see README "Coding environment and sandbox").

`probe()` reports which isolation this machine gives; `Sandbox` refuses to run with less than it
is told to require, runs each program in a fresh sandbox with resource limits and returns a
`RunResult` (status, real exit code, capped stdout/stderr and harness channel, wall time,
reason); `Sandbox.run_many` runs many in parallel.
"""

from vhack.sandbox.launch import STATUSES, Limits, RunResult
from vhack.sandbox.probe import LEVELS, IsolationReport, probe
from vhack.sandbox.runner import IsolationUnavailable, Job, Sandbox

__all__ = [
    "LEVELS",
    "STATUSES",
    "IsolationReport",
    "IsolationUnavailable",
    "Job",
    "Limits",
    "RunResult",
    "Sandbox",
    "probe",
]
