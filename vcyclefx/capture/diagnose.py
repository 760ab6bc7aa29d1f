"""What a failed capture tells its user: one short :class:`CaptureError` (the front-end, the
model, the reason, the line of user code at fault, the fix) and, on request, a dump file with
everything torch said (``$VCYCLEFX_DUMP``: the full exception chain and torch's log, which holds
the graph traced so far for a data-dependent guard).

torch prints such a graph to stderr, twice per failed attempt (a WARNING log record "Unable to
find user code corresponding to {u0}" followed by the graph, and ``torch.export`` printing the
exception's ``partial_fx_graph``), even when capture then succeeds on a fallback: hundreds of
lines. While capture runs, :func:`held_torch_logs` keeps torch's log records and what is written
to ``sys.stderr`` instead of printing them (not when ``TORCH_LOGS`` is set: whoever sets it
wants to read them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re

from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from vcyclefx.errors import CaptureError, brief, dump_note


class _Hold(logging.Filter):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.printed = io.StringIO()

    def filter(self, record):  # noqa: A003 - logging's name
        self.records.append(record)
        return False


@contextlib.contextmanager
def held_torch_logs():
    """Inside: torch's log records go to the yielded holder (its ``records``) instead of its
    stderr handlers, and what is written to ``sys.stderr`` is kept there too (its ``printed``);
    :func:`log_text` reads it."""
    hold = _Hold()
    if os.environ.get("TORCH_LOGS"):
        yield hold
        return
    loggers = [logging.getLogger("torch")] + [
        lg for name, lg in list(logging.root.manager.loggerDict.items())
        if name.startswith("torch.") and isinstance(lg, logging.Logger)]
    handlers = {id(h): h for lg in loggers for h in lg.handlers}
    for h in handlers.values():
        h.addFilter(hold)
    try:
        with contextlib.redirect_stderr(hold.printed):
            yield hold
    finally:
        for h in handlers.values():
            h.removeFilter(hold)


def log_text(hold: _Hold | None) -> str:
    """What torch logged and printed while ``hold`` held it."""
    if hold is None:
        return ""
    logged = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in hold.records)
    return f"-- torch's log:\n{logged}\n-- printed to stderr:\n{hold.printed.getvalue()}"


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n[ \t]+(\S.*)')


def user_line(e: BaseException) -> str:
    """``"<file>:<line> in <function>: <code>"``: the user's line torch names as the one that
    raised (its "The following call raised this error" frame), or ""."""
    m = _FRAME.search(str(e))
    if not m:
        return ""
    path, line, fn, code = m.groups()
    return f"{os.path.basename(path)}:{line} in {fn}: {code.strip()}"


def is_data_dependent(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, GuardOnDataDependentSymNode):
            return True
        e = e.__cause__ or e.__context__
    return False


def export_error(frontend: str, model, e: Exception, logs: _Hold | None = None,
                 mode: str = "") -> CaptureError:
    """The short error of a capture that failed with ``e``; the dump (if asked for) gets ``e``'s
    whole chain and what torch logged and printed (``logs``, from :func:`held_torch_logs`)."""
    via = "torch.export (non-strict)" if frontend == "export" else "torch.export of the fx-traced module"
    where = user_line(e)
    if is_data_dependent(e):
        fix = ("forward() branches on the value of a tensor (an `if` on a tensor, .item(), "
               ".tolist()), which a graph cannot hold: rewrite that line with torch.where or "
               "torch.cond, or make it depend on shapes or Python values only")
    elif frontend == "export":
        fix = "try frontend='fx' with concrete_args for arguments that drive Python control flow"
    else:
        fix = "try frontend='export'"
    name = type(model).__name__
    lines = [f"front-end {frontend!r} failed: {via} could not capture {name}: {brief(e)}"]
    if where:
        lines.append(f"  at {where}")
    lines.append(f"Fix: {fix}; make sure forward() runs on the example inputs as given (call "
                 "model(*example_inputs) to check).")
    what = f"capture of {name} with front-end {frontend!r}" + (f" in {mode} mode" if mode else "")
    lines.append(dump_note(what, e, log_text(logs)))
    return CaptureError("\n".join(lines))
