"""The ``planforge`` command line: the group, its global flags and error handling; the commands live in
``engines.cli.commands`` (one module per group) and only parse options and call the library.

Errors a user can fix print one line and exit with the error class's code; ``-v`` adds
tracebacks and debug logging. Ctrl-C exits 130 and leaves no partial bundle.
"""

from __future__ import annotations

import logging
import sys

import click
from rich.logging import RichHandler

from engines import __version__
from engines.cli.commands import bench, bench_llm, bench_prune, build, deploy, evaluate, generate, runtime, serve
from engines.cli.console import err_console
from foundation.errors import PlanforgeError, plain

logger = logging.getLogger("planforge")


OURS = ("planforge", "engines", "exporter", "foundation", "passes")  # the loggers -v turns to DEBUG
GLOBAL_FLAGS = {"-v": ("verbose", 1), "--verbose": ("verbose", 1), "-vv": ("verbose", 2), "-q": ("quiet", 1),
                "--quiet": ("quiet", 1)}


def _setup_logging(verbose: int, quiet: bool) -> None:
    """planforge's own records at INFO (DEBUG with -v, WARNING with -q); everyone else's (onnxscript, the
    exporter, torch: thousands of lines) at WARNING, DEBUG only with -vv."""
    handler = RichHandler(console=err_console, show_time=False, show_path=False, rich_tracebacks=verbose > 0)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format="%(message)s",
                        handlers=[handler], force=True)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for name in OURS:
        logging.getLogger(name).setLevel(level)


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """-v, -vv, -q anywhere before ``--`` count as if given before the command (``planforge build m -v``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="planforge's debug logging and tracebacks (-vv: every library's "
                                                    "debug logging too). Accepted after the command as well.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only (results still print).")
@click.version_option(__version__, "--version", prog_name="planforge", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """planforge: PyTorch -> ONNX -> graph passes -> TensorRT / ONNX Runtime bundles."""
    ctx.obj = {"verbose": verbose, "quiet": quiet}
    _setup_logging(verbose, quiet)


for module in (build, evaluate, bench, bench_llm, bench_prune, deploy, runtime, generate, serve):
    for command in module.COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    argv = _hoist_global_flags(list(argv if argv is not None else sys.argv[1:]))
    verbose = any(GLOBAL_FLAGS.get(a, ("", 0))[0] == "verbose" for a in argv)
    try:
        code = cli.main(args=argv, prog_name="planforge", standalone_mode=False)
        if isinstance(code, int) and code:  # --version and --help return through here
            return code
    except click.exceptions.Abort:
        err_console.print("interrupted: nothing was written")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except PlanforgeError as exc:
        if verbose:
            logger.exception("error")
        err_console.print(_for_stderr(f"error: {exc}"), markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except Exception as exc:  # last resort: one line unless -v
        if verbose:
            logger.exception("internal error")
        err_console.print(_for_stderr(f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)"),
                          markup=False, highlight=False, soft_wrap=True)
        return 70
    finally:
        for name in OURS:  # an in-process caller's logging is left as it was
            logging.getLogger(name).setLevel(logging.NOTSET)
    return 0


def _for_stderr(text: str) -> str:
    """Colour codes only for a terminal: a log file or CI gets plain text."""
    return text if err_console.is_terminal else plain(text)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
