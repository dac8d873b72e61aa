"""Quiet by default: what a command prints is edgepatch's own output; framework noise goes to a log file.

TensorFlow, absl, LiteRT, ExecuTorch, torchao and cpuinfo write to the process's stderr from C++ (fd 2)
and through Python loggers and warnings. `setup()` runs once at process start, before any of them is
imported, and then:
  * points fd 2 at `<log dir>/<command>.log` (appended), so C++ messages land there;
  * keeps `sys.stderr` on the terminal for rich, typer/click and tracebacks (all that edgepatch prints goes
    through them), and diverts every other write to it to the same file: a framework's own logging handler
    bound to stderr (torch), `warnings`, and C++ code printing through Python (ExecuTorch's cpuinfo lines);
  * sends every log record to the file (edgepatch's down to DEBUG) and shows only edgepatch's records on
    the terminal, at WARNING unless a command asks for more (`show_level`, e.g. `device run --log-level`);
  * routes Python warnings into logging (`py.warnings`), hence to the file.
With `verbose=True` nothing is diverted: every record (edgepatch's at DEBUG) and all framework output is
shown. Imports nothing heavy: the device path uses it too.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LOG_DIR_ENV = "EDGEPATCH_LOG_DIR"
DEFAULT_LOG_DIR = Path("edgepatch-logs")
# Read by TensorFlow/absl (and gRPC) when they load: their C++ INFO lines are dropped, warnings kept
# (into the log file). A value the user exported wins.
FRAMEWORK_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1", "GRPC_VERBOSITY": "ERROR"}
# Top-level packages whose writes to sys.stderr are a command's own output (edgepatch prints through rich).
_TERMINAL_WRITERS = frozenset({"rich", "click", "typer", "traceback"})


class _StderrRouter(io.TextIOBase):
    """`sys.stderr` while quiet: rich consoles, typer/click messages and tracebacks reach the terminal;
    anything else written to it goes to the log file."""

    def __init__(self, terminal: TextIO, log_file: TextIO) -> None:
        self.terminal, self.log_file = terminal, log_file

    def write(self, text: str) -> int:
        try:
            caller = sys._getframe(1).f_globals.get("__name__", "")
        except ValueError:  # no Python frame left: the interpreter printing an uncaught exception
            caller = "traceback"
        target = self.terminal if caller.partition(".")[0] in _TERMINAL_WRITERS else self.log_file
        return target.write(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log_file.flush()

    def fileno(self) -> int:
        return self.terminal.fileno()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.terminal.encoding


_state: dict[str, object] = {}


def log_dir(explicit: Path | None = None) -> Path:
    return explicit or Path(os.environ.get(LOG_DIR_ENV, "") or DEFAULT_LOG_DIR)


def setup(command: str = "edgepatch", verbose: bool = False, directory: Path | None = None) -> Path | None:
    """Configure logging and framework output for this process (idempotent); returns the log file, or None
    when everything is shown instead (verbose, or no writable log folder: e.g. a service whose file system
    is read-only outside its state directory; set $EDGEPATCH_LOG_DIR there)."""
    if "handler" in _state:
        return _state.get("path")  # type: ignore[return-value]
    logging.captureWarnings(True)
    root, own = logging.getLogger(), logging.getLogger("edgepatch")
    # DEBUG (every variant decision, kB each) only when asked for: the file of a long-running device stays small.
    own.setLevel(logging.DEBUG if verbose else logging.INFO)
    log_file, path = (None, None) if verbose else _open_log(directory, command)
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.setLevel(logging.NOTSET if verbose else logging.WARNING)
        root.addHandler(handler)
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        _state.update(handler=handler, path=None, verbose=verbose)
        return None
    for key, value in FRAMEWORK_ENV.items():
        os.environ.setdefault(key, value)
    sys.stderr.flush()
    terminal = open(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",  # noqa: SIM115
                    errors="backslashreplace")
    os.dup2(log_file.fileno(), 2)  # C/C++ writes to fd 2 (TF, absl, LiteRT, cpuinfo) now land in the file
    sys.stderr = _StderrRouter(terminal, log_file)
    file_handler = logging.StreamHandler(log_file)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.WARNING)
    own.addHandler(handler)  # on the 'edgepatch' logger: only our records reach the terminal
    own.propagate = True  # the file handler on root sees edgepatch's records too
    _state.update(handler=handler, path=path, verbose=False)
    return path


def _open_log(directory: Path | None, command: str) -> tuple[TextIO | None, Path | None]:
    path = log_dir(directory).resolve() / f"{command}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    except OSError:
        return None, None
    return log_file, path


def show_level(level: str | int) -> None:
    """The level from which edgepatch's own records reach the terminal (commands with --log-level). Without
    `setup()` (library use) this is a plain `logging.basicConfig`; with --verbose everything stays shown."""
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(number, int):
        number = logging.INFO
        logging.getLogger("edgepatch").warning("unknown log level %r (use DEBUG, INFO, WARNING or ERROR): "
                                               "showing INFO", level)
    handler = _state.get("handler")
    if handler is None:
        logging.basicConfig(level=number, format=LOG_FORMAT)
        return
    if not _state.get("verbose"):
        handler.setLevel(number)  # type: ignore[attr-defined]
        own = logging.getLogger("edgepatch")
        own.setLevel(min(own.level, number))


def log_path() -> Path | None:
    """The file framework output goes to (None when verbose or not set up)."""
    return _state.get("path")  # type: ignore[return-value]


# "epoch 3/15: loss 0.261", "generation 2/3: 4 new, …": a message that counts towards a known total.
_COUNTER = re.compile(r"^\s*(?P<label>[A-Za-z][A-Za-z _-]*?) (?P<done>\d+)/(?P<total>\d+)\b:?\s*(?P<rest>.*)$")


class StepLog:
    """A `log(message)` callback for long work (the export pipeline's): a run of counting messages
    ("epoch 3/15: loss 0.261") becomes one rich progress bar instead of a line each; any other message ends
    the bar (its last state stays on screen) and is printed by `print_line`."""

    def __init__(self, console: Any, print_line: Callable[[str], None]) -> None:
        self.console, self.print_line = console, print_line
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, message: str) -> None:
        match = _COUNTER.match(message)
        if match is None:
            self.close()
            self.print_line(message)
            return
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("  {task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"), console=self.console)
            self._progress.start()
        label, done, total = match["label"], int(match["done"]), int(match["total"])
        if label not in self._tasks:
            self._tasks[label] = self._progress.add_task(match["rest"], total=total, label=label)
        self._progress.update(self._tasks[label], completed=done, total=total, description=match["rest"][:80])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._tasks = None, {}
