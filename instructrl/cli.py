"""The error boundary every command shares (`main`, `sample`, `convert`, `data.convert`,
`summarize`, `tokenizer`, `plan`).

    def main(argv=None) -> int:
        return cli.run(lambda: _main(argv), argv)

    if __name__ == "__main__":
        cli.command(main)

Expected failures end the command with one line on stderr, its last line:

    InstructrlError (ConfigError, InputError, StorageError)  "error: ..."      status 2
    OSError (a file or folder the OS refuses: exists as a
      file, read-only, disk full, no permission)              "error: PATH: ..." status 2
    NonFiniteError / FloatingPointError (NaN or inf)          "error: step ..." status 3
    Preempted (SIGTERM, state saved)                          "preempted: ..."  status 143

`--verbose` prints the traceback above that line. Any other exception is a bug: it is not
caught, so Python prints its traceback (status 1). Background threads of libraries (orbax's
savers, tensorstore's event loop) print their own tracebacks when a disk fills up; without
`--verbose` those become one log line each (`quiet_background_errors`).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from instructrl.errors import InstructrlError, Preempted, os_error_line

EXIT_INPUT = 2  # bad input, config or artifact; an OS error on a path
EXIT_NONFINITE = 3  # NaN or inf in a logged metric
EXIT_PREEMPTED = 143  # 128 + SIGTERM, as if the signal had ended the process

# Log records from these packages are chatter or, on a failure, repeats of the error the
# command reports itself: their INFO lines are dropped and their tracebacks shortened.
LIBRARY_PATHS = (
    "/orbax/",
    "/jax/_src/",
    "/etils/",
    "/tensorflow_datasets/",
    "/tensorstore/",
    "/asyncio/",  # "exception was never retrieved" of a failed save's leftover futures
)


def wants_verbose(argv: Sequence[str] | None) -> bool:
    return "--verbose" in (sys.argv[1:] if argv is None else argv)


def run(
    body: Callable[[], int | None],
    argv: Sequence[str] | None = None,
    *,
    fallback_path: str | None = None,
) -> int:
    """Runs a command's `body` and returns its exit status (see the module doc).

    fallback_path: named by an OSError that carries no path of its own (e.g. a write to an
    open file on a full disk), e.g. the command's output folder.
    """
    verbose = wants_verbose(argv)
    try:
        return body() or 0
    except Preempted as e:
        line = f"preempted: {e}; run the same command again to resume"
        return _report(line, verbose, EXIT_PREEMPTED)
    except FloatingPointError as e:  # NaN/inf in a logged metric (stages.common.check_finite)
        line = f"error: {e}; the run stopped, its last checkpoint is intact"
        return _report(line, verbose, EXIT_NONFINITE)
    except InstructrlError as e:
        return _report(f"error: {_one_line(str(e))}", verbose, EXIT_INPUT)
    except OSError as e:
        return _report(f"error: {os_error_line(e, fallback_path)}", verbose, EXIT_INPUT)


def command(main: Callable[[], int]) -> NoReturn:
    """`if __name__ == "__main__": cli.command(main)`: runs a command as its own process.

    Only here (not when `main(argv)` is called in-process) are the process-wide hooks of
    `quiet_background_errors` installed; and after a failure, what library leftovers log
    while Python shuts down (a failed save's futures, collected at exit) would come after
    the command's one line: without `--verbose` it is dropped, so that line stays last."""
    verbose = wants_verbose(None)
    quiet_background_errors(verbose)
    status = main()
    if status != 0 and not verbose:
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")  # "coroutine ... was never awaited"
    sys.exit(status)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _report(line: str, verbose: bool, status: int) -> int:
    if verbose:
        traceback.print_exc(file=sys.stderr)
    # Log handlers write to stderr as well: flush them first so the line comes last.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    return status


class QuietLibraries(logging.Filter):
    """Drops the INFO chatter of library internals (orbax logs ~30 lines per save); keeps
    their warnings and errors and every line of ours. Without `verbose` a library's error
    record loses its traceback and becomes one line: when a disk fills up, orbax's threads
    log the same error with a traceback from each of them."""

    def __init__(self, verbose: bool = False):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(p in record.pathname for p in LIBRARY_PATHS)
        if not noisy:
            return True
        if record.levelno < logging.WARNING:
            return False
        if self.verbose:
            return True
        message = record.getMessage()
        if record.exc_info or record.exc_text or "\n" in message:
            message = _one_line(message)
            record.msg, record.args = message[:400] + ("..." if len(message) > 400 else ""), ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def setup_logging(verbose: bool = False) -> None:
    """INFO lines "12:00:00 INFO message" on stderr, library chatter filtered."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, QuietLibraries) for f in handler.filters):
            handler.addFilter(QuietLibraries(verbose))


def quiet_background_errors(verbose: bool) -> None:
    """Without `verbose`: an exception that ends a background thread, or that Python can
    only report as "ignored" (an unfinished coroutine of a failed save, collected at exit),
    is logged as one line instead of a traceback. The main thread's exceptions are untouched:
    the command reports its own failure (`run`), and a bug keeps its traceback."""
    if verbose:
        return

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.warning("thread %s: %s: %s", name, args.exc_type.__name__,
                        _one_line(str(args.exc_value))[:400])  # fmt: skip

    def unraisable_hook(args) -> None:
        del args  # an error inside a finaliser at exit: nothing the user can act on

    main_hook = sys.excepthook

    def except_hook(exc_type, exc, tb) -> None:
        # Native code (tensorstore's callbacks into a closed asyncio loop) prints Python
        # errors of its own threads through sys.excepthook.
        if threading.current_thread() is threading.main_thread():
            main_hook(exc_type, exc, tb)
        else:
            logging.warning("%s: %s", exc_type.__name__, _one_line(str(exc))[:400])

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
    sys.excepthook = except_hook
