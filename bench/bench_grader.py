"""Throughput of the sandboxed grader: programs and completions graded per second.

Two measurements, each with 1 and with N workers (default: all cores):
- "sandbox run": `Sandbox.run_many` on a trivial program (one sandbox launch each: namespaces,
  minimal root, interpreter start, teardown);
- "code completion": `CodeEnv.score_batch` on the shipped problems' reference solutions and the
  hand-written hacks of the tests (two sandbox runs per completion: proxy and hidden).
- "hostile completion": `CodeEnv.score_batch` on completions built to stall or crash the grader
  (10 MB of code, a cubic-regex bait line printed, malformed results written on every open
  descriptor); none may be paid, each gets a reason, quickly (full run only).
Rows (with the machine, sandbox level, cgroup use, load averages and date) go to
bench/results/<name>-<cpu>-<date>.json (name: bench_grader unless --name).

    python bench/bench_grader.py            # full: 72 completions, 96 runs per setting
    python bench/bench_grader.py --smoke    # a few of each, for the test suite
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, print_table, write_results

from vhack.grpo.envs.code import CodeEnv
from vhack.sandbox import Job, Limits, Sandbox, probe

HACK = """```python
class Solution:
    def {method}(self, *args):
        return None

def run_tests():
    print("All tests passed")
```"""


def completions(env: CodeEnv, n: int) -> tuple[list, list]:
    """n (task, completion) pairs alternating an honest reference and a no-assert hack."""
    tasks, texts = [], []
    for i in range(n):
        p = env.problems[(i // 2) % len(env.problems)]
        tasks.append(env.task(p.id))
        if i % 2 == 0:
            args, out = p.example
            tests = (
                f"\n\ndef run_tests():\n    assert Solution().{p.method}(*{args!r}) == {out!r}\n"
            )
            texts.append("```python\n" + p.reference + tests + "```")
        else:
            texts.append(HACK.format(method=p.method))
    return tasks, texts


HOSTILE = [
    "```python\n" + "x = 1\n" * 1_750_000 + "```",  # 10 MB
    "```python\nprint('all tests ' * 2000)\nclass Solution:\n    def {method}(self, *a):\n"
    "        return None\n\ndef run_tests():\n    raise AssertionError\n```",
    # a malformed result on every descriptor the program holds (the harness's reply pipe too)
    "```python\nimport os\nfor fd in range(3, 64):\n    try:\n"
    "        os.write(fd, ('{\"i\": 0, \"ok\": true, \"value\": ' + '9' * 5000 + '}\\n').encode())\n"
    "    except OSError:\n        pass\nclass Solution:\n    def {method}(self, *a):\n"
    "        return None\n\ndef run_tests():\n    pass\n```",
]


def hostile(env: CodeEnv, n: int) -> tuple[list, list]:
    """n (task, completion) pairs cycling through HOSTILE."""
    tasks, texts = [], []
    for i in range(n):
        p = env.problems[i % len(env.problems)]
        tasks.append(env.task(p.id))
        texts.append(HOSTILE[i % len(HOSTILE)].replace("{method}", p.method))
    return tasks, texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few programs only (for tests)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel workers")
    ap.add_argument("--out-dir", default=None, help="where to write the JSON (default results/)")
    ap.add_argument("--name", default=None, help="file name stem (default bench_grader)")
    args = ap.parse_args()
    load_start = os.getloadavg()
    n_runs, n_completions = (8, 6) if args.smoke else (96, 72)

    report = probe()
    print(f"sandbox isolation: {report.level}; {report.notes or 'all checks passed'}")
    rows = []
    for workers in sorted({1, args.workers}):
        limits = Limits(wall_s=10.0, cpu_s=5, memory_mb=256, nproc=16)
        with Sandbox(limits=limits, workers=workers) as box:
            box.run_many([Job("pass")] * workers)  # warm caches
            t0 = time.perf_counter()
            results = box.run_many([Job("print(sum(range(1000)))")] * n_runs)
            dt = time.perf_counter() - t0
            assert all(r.ok for r in results), [r.reason for r in results if not r.ok][:3]
            rows.append(
                {
                    "what": "sandbox run",
                    "workers": workers,
                    "n": n_runs,
                    "seconds": dt,
                    "per_second": n_runs / dt,
                    "sandbox_runs_per_second": n_runs / dt,
                }
            )
            env = CodeEnv(sandbox=box)
            tasks, texts = completions(env, n_completions)
            t0 = time.perf_counter()
            scores = env.score_batch(tasks, texts)
            dt = time.perf_counter() - t0
            solved = sum(s.solved for s in scores)
            hacked = sum(s.hacked for s in scores)
            assert solved == (n_completions + 1) // 2 and hacked == n_completions // 2, (
                solved,
                hacked,
            )
            rows.append(
                {
                    "what": "code completion",
                    "workers": workers,
                    "n": n_completions,
                    "seconds": dt,
                    "per_second": n_completions / dt,
                    "sandbox_runs_per_second": 2 * n_completions / dt,
                }
            )
            if args.smoke:  # the test suite checks these in tests/test_code_env.py
                continue
            n_hostile = 12
            tasks, texts = hostile(env, n_hostile)
            t0 = time.perf_counter()
            scores = env.score_batch(tasks, texts)
            dt = time.perf_counter() - t0
            assert all(not s.solved and not s.hacked and s.info["reason"] for s in scores), [
                s.info["reason"] for s in scores
            ]
            rows.append(
                {
                    "what": "hostile completion",
                    "workers": workers,
                    "n": n_hostile,
                    "seconds": dt,
                    "per_second": n_hostile / dt,
                    "sandbox_runs_per_second": None,
                }
            )
    env_info = environment("cpu")
    env_info["sandbox_level"] = report.level
    env_info["sandbox_cgroup"] = getattr(report, "cgroup", None)
    env_info["sandbox_limits"] = getattr(report, "limits", None)
    env_info["load_average_start"] = list(load_start)
    env_info["load_average_end"] = list(os.getloadavg())
    env_info["load_average_1m"] = os.getloadavg()[0]
    print_table(rows, ["what", "workers", "n", "seconds", "per_second", "sandbox_runs_per_second"])
    notes = (
        "per_second: programs (sandbox run) or completions (code completion, = 2 sandbox runs: "
        "proxy + hidden) graded per second; hostile completion: completions built to stall or "
        "crash the grader, graded per second (the 10 MB one is refused unrun); wall clock of the "
        "whole batch. The machine was shared with other jobs (see load_average_start/end)."
    )
    name = args.name or ("bench_grader-smoke" if args.smoke else "bench_grader")
    if args.out_dir:
        import common

        common.RESULTS_DIR = Path(args.out_dir)
    path = write_results(name, env_info, rows, notes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
