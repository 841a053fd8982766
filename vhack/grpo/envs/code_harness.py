"""The code environment's harnesses: the program the sandbox runs next to the completion's code.

Standard library only: this file's text, followed by `main("proxy")` or `main("hidden")`, is the
sandbox's main.py (see `harness_program`); the completion's code is solution.py beside it.

Two processes, so that the code being graded never holds the harness channel:

- the driver: the sandbox's program process. It never runs the completion's code. It holds the
  harness channel (fd 3, a pipe to the grader) and makes itself non-dumpable first, so a process
  of the same uid can neither read its memory nor open its fds through /proc (ptrace and
  pidfd_getfd are refused by the sandbox's seccomp filter as well). Its wait status mirrors the
  worker's, so the sandbox's `RunResult.status` is the worker's real end.
- the worker: forked by the driver before the completion's code, or any hidden input, is in
  memory. It closes fd 3, loads solution.py and performs one step at a time as the driver asks:
  load the code, run `run_tests()`, call the method on one case, run the mutant.

Protocol: for each step the driver writes one request line "<nonce> <request>\\n" with a fresh
random nonce, drawn after the previous step ended; the worker answers with one line
"<nonce> <reply>\\n" (requests and replies are words, or JSON for a hidden case; see `_worker`).
The driver records a reply only when it answers the request under way, records the worker's end
from its own wait status (it is the worker's parent), and writes its record on the channel as
JSON lines: the proxy's {"mark": name} ("loaded", "started", then "finished", "raised" or
"exit_called"), the hidden run's {"loaded": bool}, {"i": case, "ok", "value", "always_equal",
"error"} and {"mutant": "survived" | "killed" | "exit"}.

What the completion's code can still do: it runs in the worker, so it can answer the step under
way itself (it can read the nonce from the harness's frame). It gains nothing by that: every
record it can produce so, a program that never touches the pipes produces too (answering
"returned" from inside run_tests() is run_tests() returning there; answering a case with a value
is the method returning it). Bytes that answer no request under way (a reply written early, a
second reply, a guessed nonce, an unreadable or oversized line) are a violation: the driver
kills the worker and writes {"violation": why}, which fails the completion.
The hidden inputs reach the worker one case at a time, as the arguments of the call that needs
them; the expected outputs never leave the grader.
"""

import _signal  # the C module: `signal` would import enum, a few ms per run
import builtins
import ctypes
import os
import select
import sys

CHANNEL_FD = 3  # the sandbox's pipe to the grader
MAX_VALUE_DEPTH = 32  # deepest nesting of a result value the worker reports as a value
MAX_REPLY_BYTES = 1 << 20  # a longer reply line is a violation
PR_SET_DUMPABLE = 4
LOAD_REPLIES = ("loaded", "loaded no_run_tests")  # else "failed <error>"
RUN_TESTS_REPLIES = {"returned": "finished", "raised": "raised", "exit_called": "exit_called"}
MUTANT_REPLIES = ("survived", "killed", "exit", "not_run")


def _write_line(fd: int, text: str) -> None:
    """Write `text` and a newline on `fd`, all of it (a pipe may take it in parts)."""
    data = memoryview((text + "\n").encode())
    while data:
        data = data[os.write(fd, data) :]


# ---------------------------------------------------------------------------------------------
# the worker: runs the completion's code, one step per request


class _Fresh:
    """Equal only to itself: what the mutant method returns."""


_PLAIN = (int, str, bool, float, type(None))


def _check_plain(value: object, depth: int = 0) -> None:
    """Raise TypeError unless `value` is made of JSON types only, nested at most MAX_VALUE_DEPTH."""
    if depth > MAX_VALUE_DEPTH:
        raise TypeError(f"value nested deeper than {MAX_VALUE_DEPTH}")
    if type(value) in _PLAIN:
        return
    if type(value) is list:
        for x in value:
            _check_plain(x, depth + 1)
        return
    if type(value) is dict:
        for k, x in value.items():
            if type(k) is not str:
                raise TypeError("dict key of type " + type(k).__name__)
            _check_plain(x, depth + 1)
        return
    raise TypeError("value of type " + type(value).__name__)


def _describe(e: BaseException) -> str:
    """One line: the exception's type and message."""
    return (type(e).__name__ + ": " + str(e)[:200]).replace("\n", " ")


def _call_reply(ns: dict, method: str, args: list) -> dict:
    """The reply to one case: {"ok": True, "value", "always_equal"} or {"ok": False, "error"}."""
    import json

    try:
        value = getattr(ns.get("Solution")(), method)(*args)
    except BaseException as e:
        return {"ok": False, "error": _describe(e)}
    try:
        always = bool(value == _Fresh()) and bool(value == _Fresh())
    except BaseException:
        always = False
    try:
        _check_plain(value)
        json.dumps(value)  # past the int digit limit, for one
    except BaseException as e:
        return {"ok": False, "error": "returned " + str(e)[:100], "always_equal": always}
    return {"ok": True, "value": value, "always_equal": always}


def _mutant_reply(defined: dict, method: str) -> str:
    """Run run_tests() with the method replaced by a stub returning a fresh object. defined:
    Solution and run_tests as loading left them (the code cannot hide them from the mutant by
    deleting its globals later)."""
    cls, run_tests = defined.get("Solution"), defined.get("run_tests")
    if not isinstance(cls, type) or not callable(run_tests):
        return "not_run"

    def stub(self, *args, **kwargs):
        return _Fresh()

    try:
        setattr(cls, method, stub)
        run_tests()
    except SystemExit:
        return "exit"
    except BaseException:
        return "killed"
    return "survived"


def _worker(requests_fd: int, replies_fd: int) -> None:
    """Answer the driver's requests until it asks to exit (returns: the interpreter then exits
    normally) or a step ends the process (an exception raised on, as a program's would be).

    Requests and replies: "load" or "load fatal" -> "loaded", "loaded no_run_tests" or
    "failed <error>" (fatal: the exception is then raised on); "run_tests" -> "returned",
    "raised" or "exit_called" (an exception is raised on, a return ends the worker normally);
    "call <JSON {method, args}>" -> JSON {ok, value | error, always_equal}; "mutant <method>"
    -> "survived", "killed", "exit" or "not_run"; "exit [message]" -> none (the worker exits)."""
    builtins.exit = builtins.quit = sys.exit  # python -S: site does not define them
    requests = os.fdopen(requests_fd, "rb")
    ns = {"__name__": "solution", "__builtins__": builtins}
    defined: dict = {}  # Solution and run_tests as loading left them

    def reply(nonce: str, text: str) -> None:
        _write_line(replies_fd, nonce + " " + text)

    while True:
        line = requests.readline()
        if not line:
            return  # the driver is gone
        nonce, _, request = line.decode().rstrip("\n").partition(" ")
        step, _, arg = request.partition(" ")
        if step == "load":
            try:
                with open("solution.py") as f:
                    source = f.read()
                exec(compile(source, "solution.py", "exec"), ns)
            except BaseException as e:
                defined = {k: ns.get(k) for k in ("Solution", "run_tests")}
                reply(nonce, "failed " + _describe(e))
                if arg == "fatal":
                    raise
                continue
            defined = {k: ns.get(k) for k in ("Solution", "run_tests")}
            reply(nonce, LOAD_REPLIES[0] if callable(ns.get("run_tests")) else LOAD_REPLIES[1])
        elif step == "run_tests":
            try:
                ns["run_tests"]()
            except SystemExit:
                reply(nonce, "exit_called")
                raise
            except BaseException:
                reply(nonce, "raised")
                raise
            reply(nonce, "returned")
            return
        elif step == "call":
            import json

            case = json.loads(arg)
            reply(nonce, json.dumps(_call_reply(ns, case["method"], case["args"])))
        elif step == "mutant":
            reply(nonce, _mutant_reply(defined, arg))
        elif step == "exit":
            if arg:
                raise SystemExit(arg)
            return


# ---------------------------------------------------------------------------------------------
# the driver: asks, checks, records


class Violation(Exception):
    """The worker wrote something that answers no request (only the graded code does that)."""


class _Driver:
    """Talks to one worker: `ask` one step at a time, `finish` to take on its end."""

    def __init__(self, pid: int, requests_fd: int, replies_fd: int) -> None:
        self.pid, self.requests_fd, self.replies_fd = pid, requests_fd, replies_fd
        self.pending = b""  # reply bytes read but not yet used
        self.status: int | None = None  # the worker's wait status, once it ended
        try:
            self.exited_fd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): poll waitpid instead
            self.exited_fd = None

    def _reap(self, block: bool) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            if pid == self.pid:
                self.status = status
        return self.status is not None

    def ask(self, request: str) -> str | None:
        """The worker's reply to `request` (one line of text), or None when it ended (or stopped
        listening) without one. Raises Violation for bytes that answer no request."""
        if self.status is not None:
            return None
        if self.pending:
            raise Violation("the worker wrote a reply before it was asked")
        nonce = os.urandom(16).hex()
        try:
            _write_line(self.requests_fd, nonce + " " + request)
        except OSError:  # the worker closed its end: it cannot be asked anything any more
            self._reap(block=True)
            return None
        line = self._read_line()
        if line is None:
            return None
        head = (nonce + " ").encode()
        if not line.startswith(head):
            raise Violation("the worker's reply answers no request")
        try:
            return line[len(head) :].decode()
        except UnicodeDecodeError:
            raise Violation("the worker's reply is not UTF-8") from None

    def _read_line(self) -> bytes | None:
        """The next reply line, or None once the worker ended without completing one."""
        while b"\n" not in self.pending:
            if len(self.pending) > MAX_REPLY_BYTES:
                raise Violation(f"a reply line over {MAX_REPLY_BYTES} bytes")
            waiting = [self.replies_fd] + ([self.exited_fd] if self.exited_fd is not None else [])
            ready, _, _ = select.select(waiting, [], [], 0.02 if self.exited_fd is None else None)
            if self.replies_fd in ready:
                chunk = os.read(self.replies_fd, 65536)
                if chunk:
                    self.pending += chunk
                    continue
                self._reap(block=True)  # every writer closed: the worker is ending
                return None
            if self._reap(block=False):  # ended: take what it wrote before it did
                os.set_blocking(self.replies_fd, False)
                try:
                    while chunk := os.read(self.replies_fd, 65536):
                        self.pending += chunk
                except BlockingIOError:
                    pass
                if b"\n" not in self.pending:
                    return None
        line, _, self.pending = self.pending.partition(b"\n")
        return line

    def kill(self) -> None:
        if self.status is None:
            os.kill(self.pid, _signal.SIGKILL)
            self._reap(block=True)

    def finish(self) -> None:
        """Wait for the worker to end, then end the same way (exit status or signal)."""
        self._reap(block=True)
        status = self.status
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig not in (_signal.SIGKILL, _signal.SIGSTOP):
                _signal.signal(sig, _signal.SIG_DFL)
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)  # a signal whose default is not to terminate
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _record(line: str) -> None:
    """Write one JSON line on the channel."""
    _write_line(CHANNEL_FD, line)


def _record_word(key: str, word: str) -> None:
    """Record {key: word} (JSON without the json module: printable ASCII, no quotes)."""
    safe = "".join(c if " " <= c <= "~" and c not in '\\"' else "?" for c in word)
    _record(f'{{"{key}": "{safe}"}}')


def _expect(reply: str, allowed) -> str:
    """`reply`, which must be one of `allowed` (the worker's only answers to that step)."""
    if reply not in allowed:
        raise Violation(f"the worker's reply {reply[:40]!r} answers no request")
    return reply


def _drive_proxy(driver: _Driver) -> None:
    """Load, then run_tests(); the marks "loaded", "started" and how run_tests() ended."""
    reply = driver.ask("load fatal")
    if reply is None or reply.startswith("failed "):
        return
    _record_word("mark", "loaded")
    if _expect(reply, LOAD_REPLIES) != "loaded":
        driver.ask("exit run_tests() is not defined")
        return
    _record_word("mark", "started")
    reply = driver.ask("run_tests")
    if reply is not None:
        _record_word("mark", RUN_TESTS_REPLIES[_expect(reply, RUN_TESTS_REPLIES)])


def _drive_hidden(driver: _Driver) -> None:
    """Load, each hidden case in turn (read from stdin only now), then the mutant."""
    import json

    job = json.loads(sys.stdin.readline())
    method = job["method"]
    reply = driver.ask("load")
    if reply is None:
        return
    if reply.startswith("failed "):
        _record(json.dumps({"loaded": False, "error": reply[7:307]}))
    else:
        _expect(reply, LOAD_REPLIES)
        _record('{"loaded": true}')
    for i, args in enumerate(job["cases"]):
        reply = driver.ask("call " + json.dumps({"method": method, "args": args}))
        if reply is None:
            _record(json.dumps({"i": i, "ok": False, "error": "the program ended in this case"}))
            return
        try:
            result = json.loads(reply)
        except (ValueError, RecursionError) as e:
            raise Violation(f"the worker's reply is not JSON: {str(e)[:100]}") from None
        if not isinstance(result, dict) or type(result.get("ok")) is not bool:
            raise Violation("the worker's reply to a case has no ok")
        line = {"i": i, "ok": result["ok"]}
        if result["ok"]:
            if "value" not in result:
                raise Violation("the worker's reply has ok=true and no value")
            line["value"] = result["value"]
        else:
            line["error"] = str(result.get("error", ""))[:300]
        line["always_equal"] = result.get("always_equal") is True
        _record(json.dumps(line))
    reply = driver.ask("mutant " + method)
    if reply is None:
        _record_word("mutant", "exit")
        return
    if _expect(reply, MUTANT_REPLIES) != "not_run":
        _record_word("mutant", reply)
    driver.ask("exit")


def main(kind: str) -> None:
    """Run the "proxy" or "hidden" harness: fork the worker, drive it, end as it ended."""
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # the worker may signal us; ignore it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise SystemExit("harness: prctl(PR_SET_DUMPABLE, 0) failed")
    if kind == "hidden":
        import json  # noqa: F401  (imported once, before the fork, for both processes)
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        for fd in (CHANNEL_FD, requests_w, replies_r):
            os.close(fd)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)  # the hidden job stays with the driver
        os.close(null)
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # as any program (the driver stays not dumpable)
        _worker(requests_r, replies_w)
        return  # the interpreter exits normally (atexit handlers run, as for any program)
    os.close(requests_r)
    os.close(replies_w)
    driver = _Driver(pid, requests_w, replies_r)
    try:
        _drive_proxy(driver) if kind == "proxy" else _drive_hidden(driver)
    except Violation as e:
        driver.kill()
        _record_word("violation", str(e))
        sys.stderr.write(f"harness: {e}\n")
        sys.stderr.flush()
        os._exit(1)
    os.close(requests_w)  # a worker still reading sees the end of its requests
    driver.finish()
