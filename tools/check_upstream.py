"""Do the model-family tests pass with the newest releases of the model libraries?

CI pins exact versions (``pip install -e '.[test]' -c constraints/ci.txt``); this script is how
a new release of transformers, timm, torchvision, onnx, onnxscript, onnxruntime or accelerate
is heard of first. In a temporary venv it installs the repository with ``pip install --upgrade
-e '.[test]'`` and those libraries (and torch, as new as pip may install here) *without* the
constraints file, prints the pinned and the installed versions, runs the model-family tests
there (junit xml, a time limit) and reports each failure: its family (the test's parameter id),
error type and, for ``UnsupportedOp``, the op without a rule; then the failures by op and by
family, and the counts. Table printed last. Exit status: 0 all passed, 1 a test failed, 2 a
step failed (venv, install, the test run itself or its time limit). Not run by CI.

    python tools/check_upstream.py                   # install (~2 min) + the not-slow tests
    python tools/check_upstream.py --keep            # keep the venv; reuse it with --venv PATH
    python tools/check_upstream.py --freeze constraints/ci.txt   # new pins after a passing run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints" / "ci.txt"
# the libraries whose newest releases are checked (torch: capped by what pip offers here)
LIBRARIES = ("torch", "transformers", "timm", "torchvision", "onnx", "onnxscript", "onnxruntime",
             "accelerate")
FAMILY_TESTS = ("tests/test_op_families.py", "tests/test_families.py",
                "tests/test_frontier_families.py", "tests/test_to_module.py", "tests/test_onnx.py",
                "tests/test_recurrent_and_weight_norm.py")  # new overloads, then model families

_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"  # a dotted Python name
_NO_RULE = re.compile(r"\bop ([\w.:]+) has no vcyclefx rule")  # vcyclefx.analysis.registry
_EXC_PREFIX = re.compile(rf"^({_NAME}): ")  # "vcyclefx.errors.UnsupportedOp: %x ..."
_SETUP_EXC = re.compile(rf'failed on \w+ with "({_NAME}): ')  # errors in setup / teardown
_E_LINE = re.compile(rf"^E\s+({_NAME}): ", re.M)  # pytest's exception lines in a traceback
_LOCATION = re.compile(r"^\S+:\d+: (\w+)$", re.M)  # "tests/x.py:12: AssertionError"


@dataclass(frozen=True)
class Result:
    """One test case of a junit xml file."""

    test: str  # "tests/test_families.py::test_x[mamba2]"
    family: str  # the pytest parameter id in brackets ("mamba2"); "" when not parametrised
    outcome: str  # "passed" | "failed" | "error" (setup, teardown, collection) | "skipped"
    error_type: str = ""  # the exception's class name ("UnsupportedOp") for failed / error
    op: str = ""  # the op without a vcyclefx rule named by the failure, if any
    message: str = ""  # the first line of the failure (or skip) message

    @property
    def file(self) -> str:
        return self.test.split("::")[0]


# ---- parsing and the report (plain functions; tests/test_check_upstream.py runs them) ----

def parse_junit(path) -> list[Result]:
    """Every test case of the junit xml file pytest wrote at ``path``, in file order."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if not name:  # the empty case pytest writes for the test a Ctrl-C (or the time limit) cut
            continue
        m = re.search(r"\[(.*)\]$", name)
        common = dict(test=_test_id(case), family=m.group(1) if m else "")
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        bad = failure if failure is not None else error
        if bad is not None:
            msg, body = bad.get("message") or "", bad.text or ""
            out.append(Result(**common, outcome="failed" if failure is not None else "error",
                              error_type=_error_type(msg, body), op=_op(msg, body),
                              message=_first_line(msg) or _first_line(body)))
        elif skipped is not None:
            out.append(Result(**common, outcome="skipped",
                              message=_first_line(skipped.get("message") or "")))
        else:
            out.append(Result(**common, outcome="passed"))
    return out


def _test_id(case: ET.Element) -> str:
    """``file::Class::name`` from the xunit1 attributes, else ``classname::name``."""
    classname, name, file = case.get("classname", ""), case.get("name", ""), case.get("file")
    if not file:
        return f"{classname}::{name}" if classname else name
    module = file[:-3].replace("/", ".") if file.endswith(".py") else file
    cls = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
    return "::".join(p for p in (file, cls, name) if p)


def _error_type(message: str, body: str) -> str:
    """The class name of the exception a failure ended with: from pytest's message
    (``Type: text``), else from the traceback's last ``E   Type: text`` or ``file:line: Type``
    line; a rewritten ``assert`` without the class name is an AssertionError."""
    for pattern, text in ((_EXC_PREFIX, message), (_SETUP_EXC, message)):
        m = pattern.search(text)
        if m and m.group(1).split(".")[-1][:1].isupper():
            return m.group(1).split(".")[-1]
    for pattern in (_E_LINE, _LOCATION):
        found = pattern.findall(body)
        if found:
            return found[-1].split(".")[-1]
    return "AssertionError" if message.startswith("assert ") else "unknown"


def _op(message: str, body: str) -> str:
    m = _NO_RULE.search(message) or _NO_RULE.search(body)
    return m.group(1) if m else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def report(results: list[Result], versions: dict[str, tuple[str | None, str | None]]) -> str:
    """The readable report: versions (``name -> (pinned, installed)``), each failing test,
    the failures grouped by op without a rule and by family, the counts, and a table of counts
    per test file (printed last)."""
    lines = []
    if versions:
        lines += ["versions (pinned in constraints/ci.txt -> newest installed):",
                  *_version_lines(versions), ""]
    bad = [r for r in results if r.outcome in ("failed", "error")]
    lines.append(f"failing tests ({len(bad)}):" if bad else "failing tests: none")
    for r in bad:
        lines.append(f"  {r.outcome.upper()} {r.test}")
        lines.append(f"      {f'family {r.family}' if r.family else 'not parametrised'}  "
                     f"{r.error_type}" + (f"  op {r.op}" if r.op else ""))
        if r.message:
            lines.append(f"      {_cut(r.message, 200)}")
    by_op: dict[str, list[str]] = defaultdict(list)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for r in bad:
        if r.op and _who(r) not in by_op[r.op]:
            by_op[r.op].append(_who(r))
        by_family[f"family {r.family}" if r.family else "not parametrised"][
            r.error_type + (f" ({r.op})" if r.op else "")] += 1
    if bad:
        lines.append("")
        for op, families in sorted(by_op.items()):
            lines.append(f"ops without a rule: {op} (families: {', '.join(families)})")
        if not by_op:
            lines.append("ops without a rule: none")
        for family, kinds in sorted(by_family.items()):
            what = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(kinds.items()))
            lines.append(f"{family}: {sum(kinds.values())} failing ({what})")
    counts = Counter(r.outcome for r in results)
    lines += ["", f"passed {counts['passed']}, failed {counts['failed']}, "
                  f"errors {counts['error']}, skipped {counts['skipped']} ({len(results)} tests)"]
    moved = [f"{n} {p} -> {i}" for n, (p, i) in versions.items() if _moved(p, i)]
    lines += ["", "moved since constraints/ci.txt: " + ("; ".join(moved) if moved else "none"),
              _table(results)]
    return "\n".join(lines)


def _who(r: Result) -> str:
    """A failing test's family, else (not parametrised) its function's name, cut short."""
    return r.family or _cut(r.test.split("::")[-1], 40)


def _public(version: str | None) -> str | None:
    return version.split("+")[0] if version else version  # 2.14.1+cu130 is torch 2.14.1


def _moved(pinned: str | None, installed: str | None) -> bool:
    return bool(pinned and installed and _public(pinned) != _public(installed))


def _version_lines(versions: dict[str, tuple[str | None, str | None]]) -> list[str]:
    w = max(len(n) for n in versions)
    out = []
    for name, (pinned, installed) in versions.items():
        mark = ("moved" if _moved(pinned, installed) else "no pin" if not pinned
                else "not installed" if not installed else "same")
        out.append(f"  {name:{w}s}  {pinned or '-':>12s} -> {installed or '-':12s}  {mark}")
    return out


def _table(results: list[Result]) -> str:
    """Counts per test file and a total row; the families with a failure last."""
    files = list(dict.fromkeys(r.file for r in results))
    rows = []
    for f in [*files, "total"]:
        rs = [r for r in results if f in ("total", r.file)]
        c = Counter(r.outcome for r in rs)
        failing = sorted({_who(r) for r in rs if r.outcome in ("failed", "error")})
        rows.append([f, str(c["passed"]), str(c["failed"]), str(c["error"]), str(c["skipped"]),
                     ", ".join(failing) or "-"])
    head = ["tests", "passed", "failed", "errors", "skipped", "failing families"]
    w = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(c.ljust(w[i]) if i in (0, 5) else c.rjust(w[i])  # noqa: E731
                                for i, c in enumerate(row)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * n for n in w]), *map(fmt, rows)])


def read_pins(path: Path) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of a pip freeze file (names
    normalised: lower case, ``-`` for ``_`` and ``.``)."""
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#")[0].split(";")[0].strip()
            if "==" in line and not line.startswith("-"):
                name, version = (s.strip() for s in line.split("==", 1))
                pins[_norm(name)] = version.split()[0]
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- the steps: venv, install, versions, tests ----

class StepFailed(Exception):
    """A step that must succeed for the check to mean anything did not."""

    def __init__(self, step: str, why: str, log: Path | None = None):
        super().__init__(f"step '{step}' failed: {why}")
        self.log = log


class Clock:
    def __init__(self):
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        s = int(time.monotonic() - self.t0)
        print(f"[{s // 60:3d}m{s % 60:02d}s] {text}", flush=True)


def run_logged(cmd: list[str], log: Path, limit_s: float, env: dict, tick=None) -> tuple[int, bool]:
    """Run ``cmd`` in the repository with its output in ``log``; ``(returncode, timed_out)``.
    Past ``limit_s`` the process group gets SIGINT (pytest then still writes its junit xml),
    then SIGKILL a minute later."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + limit_s
        try:
            while True:
                try:
                    return proc.wait(timeout=10), False
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        _stop(proc)
                        return proc.returncode, True
                    if tick is not None:
                        tick()
        except BaseException:  # Ctrl-C here: leave no pip or pytest running
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def child_env(venv: Path) -> dict:
    """The environment of the venv's processes: its bin first on PATH, nothing from a
    PYTHONPATH that would shadow what was installed there."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_venv(venv: Path, clock: Clock) -> None:
    if (venv / "bin" / "python").exists():
        clock.say(f"reusing the venv {venv}")
        return
    clock.say(f"creating a venv in {venv}")
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if done.returncode != 0:
        raise StepFailed("creating venv", f"python -m venv exited {done.returncode}\n"
                         + (done.stdout + done.stderr)[-3000:])


def install(py: Path, work: Path, env: dict, limit_s: float, clock: Clock) -> None:
    cmd = [str(py), "-m", "pip", "install", "--upgrade", "-e", f"{REPO}[test]", *LIBRARIES]
    clock.say("installing (no constraints file): " + " ".join(cmd[1:]))
    log = work / "pip-install.log"
    rc, timed_out = run_logged(cmd, log, limit_s, env)
    if rc != 0 or timed_out:
        why = f"timed out after {limit_s:.0f} s" if timed_out else f"pip exited {rc}"
        raise StepFailed("installing", f"{why}; pip's last lines:\n{tail(log)}", log)
    clock.say("installed")


def installed_versions(py: Path, env: dict) -> tuple[dict[str, str | None], str]:
    """``name -> version`` of LIBRARIES in the venv (None: not installed) and its Python."""
    code = ("import importlib.metadata as m, json, platform\nv = {}\n"
            f"for n in {list(LIBRARIES)!r}:\n"
            "    try: v[n] = m.version(n)\n    except m.PackageNotFoundError: v[n] = None\n"
            "print(json.dumps([v, platform.python_version()]))")
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StepFailed("reading versions", done.stderr[-3000:])
    versions, python = json.loads(done.stdout)
    return versions, python


def pytest_options(junit: Path) -> list[str]:
    """pytest's options for a run whose report is read from ``junit`` (xunit1: test cases name
    their file; short tracebacks in the xml; no summary on the terminal: the report is it)."""
    return ["-p", "no:cacheprovider", "-n", "auto", "--dist", "loadfile", "--tb=short", "-rN",
            "--continue-on-collection-errors",
            "-o", "junit_family=xunit1", f"--junitxml={junit}"]


def run_tests(py: Path, work: Path, env: dict, args, clock: Clock) -> tuple[Path, int, bool]:
    junit, log = work / "junit.xml", work / "pytest.log"
    cmd = [str(py), "-m", "pytest", *args.tests, *pytest_options(junit)]
    if not args.slow:
        cmd += ["-m", "not slow"]
    clock.say("running pytest: " + " ".join(cmd[1:]))
    seen = {"count": None, "percent": None, "said": time.monotonic()}

    def tick():  # progress from pytest's own output: "collected N ..." and "[ 42%]"
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
        if m and seen["count"] is None:
            seen["count"] = m.group(3) or m.group(1)
            clock.say(f"running {seen['count']} tests (time limit {args.timeout:.0f} s)")
        pct = re.findall(r"\[\s*(\d+)%\]", text)
        if pct and pct[-1] != seen["percent"] and time.monotonic() - seen["said"] > 60:
            seen["percent"], seen["said"] = pct[-1], time.monotonic()
            clock.say(f"{pct[-1]}% of the tests done")

    rc, timed_out = run_logged(cmd, log, args.timeout, env, tick)
    tick()
    summary = [ln for ln in tail(log, 5).splitlines() if ln.startswith("=")]
    clock.say(f"pytest exited {rc}"
              + (f" (timed out after {args.timeout:.0f} s)" if timed_out else "")
              + (": " + summary[-1].strip("= ") if summary else ""))
    if not junit.exists():
        raise StepFailed("running tests", f"pytest exited {rc} and wrote no junit xml; its last "
                         f"lines:\n{tail(log)}", log)
    return junit, rc, timed_out


def write_freeze(py: Path, path: Path, python: str, tests: list[str], env: dict) -> None:
    """The venv's ``pip freeze --exclude-editable`` as a constraints file at ``path``."""
    done = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StepFailed("freezing", done.stderr[-3000:])
    today = datetime.date.today().isoformat()
    header = ("# Exact versions for CI (pip install -e '.[test]' -c constraints/ci.txt); run the "
              "whole suite with them before committing.\n"
              f"# Made by: tools/check_upstream.py --freeze ({today}, Python {python}): pip freeze "
              f"--exclude-editable in its venv after {' '.join(tests)} passed there.\n"
              "# Move it forward when tools/check_upstream.py reports the newest releases pass "
              "(README, Development).\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + done.stdout)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", nargs="+", default=list(FAMILY_TESTS), help="pytest paths or ids")
    p.add_argument("--slow", action="store_true", help="also run the tests marked slow")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds the install and the test run may each take (default 1800)")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (venv, pip and pytest logs, junit xml)")
    p.add_argument("--venv", type=Path, help="use (or create and keep) the venv at this path")
    p.add_argument("--constraints", type=Path, default=CONSTRAINTS,
                   help="the pins to compare with (default constraints/ci.txt)")
    p.add_argument("--freeze", type=Path, metavar="PATH",
                   help="after a run where every test passed, write the venv's pip freeze "
                        "(--exclude-editable) to PATH as a new constraints file")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    clock = Clock()
    work = Path(tempfile.mkdtemp(prefix="vcyclefx-upstream-"))
    venv = (args.venv or work / "venv").resolve()
    py, env = venv / "bin" / "python", child_env(venv)
    if args.keep:
        clock.say(f"keeping {work}" + (f" (venv: {venv}; reuse it with --venv {venv})"
                                       if args.venv is None else ""))
    try:
        make_venv(venv, clock)
        install(py, work, env, args.timeout, clock)
        found, python = installed_versions(py, env)
        pins = read_pins(args.constraints)
        versions = {n: (pins.get(_norm(n)), found[n]) for n in LIBRARIES}
        if not pins:
            clock.say(f"no pins read from {args.constraints} (missing or empty)")
        moved = [n for n, (p, i) in versions.items() if _moved(p, i)]
        clock.say("newest: " + ", ".join(f"{n} {i}" for n, (_, i) in versions.items())
                  + f" (moved since the pins: {', '.join(moved) or 'none'})")
        junit, rc, timed_out = run_tests(py, work, env, args, clock)
        results = parse_junit(junit)
        failed = sum(r.outcome in ("failed", "error") for r in results)
        if args.freeze:
            if failed or rc != 0 or timed_out:
                clock.say(f"--freeze: {args.freeze} not written "
                          f"({failed} failed, pytest exit {rc})")
            else:
                write_freeze(py, args.freeze, python, args.tests, env)
                clock.say(f"--freeze: wrote {args.freeze}")
        problem = (f"the test run timed out after {args.timeout:.0f} s: only the tests that "
                   "finished are reported" if timed_out else
                   f"pytest exited {rc} (not a test failure)" if rc not in (0, 1) else "")
        if problem:
            clock.say("step 'running tests' failed: " + problem)
        clock.say(f"report of {junit.name}")
        print(report(results, versions), flush=True)
        return 2 if problem else 1 if failed or rc else 0
    except KeyboardInterrupt:
        clock.say("interrupted (the running pip or pytest was stopped)")
        return 130
    except StepFailed as e:
        print(f"\n{e}", file=sys.stderr, flush=True)
        if e.log is not None:
            print(f"whole log: {e.log}" if args.keep else "(--keep keeps the whole log)",
                  file=sys.stderr, flush=True)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
