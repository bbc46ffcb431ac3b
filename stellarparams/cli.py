"""The `stellarparams` command: a thin layer over the library.

Each subcommand lives in the module of its pipeline stage, which defines
`add_arguments(parser)` and `run_cli(args) -> int`. Modules are imported only when
their subcommand runs, so `stellarparams --help` stays fast.

This is the one place where options are checked (:func:`check_options`, before any
command starts) and where errors become exit codes (:func:`exit_code`); commands raise,
they do not choose codes:

====  =====================================================================
0     done
1     nothing usable (every input rejected, no spectrum kept, nothing downloaded)
2     bad input or option, or an output that cannot be written (one line naming it)
3     the output is being written by another process (``--wait`` waits instead)
130   interrupted (Ctrl-C or SIGTERM); re-running the same command resumes
====  =====================================================================
"""
import argparse
import importlib
import os
import signal
import sys

from . import __version__

EXIT_DONE, EXIT_NOTHING_USABLE, EXIT_BAD_INPUT, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MAX_GRID_PIXELS = 100_000  # --grid N: survey spectra have 4,000-8,000 pixels; more only costs memory

# name -> (module, one-line help), in pipeline order
COMMANDS = {
    "fetch": ("stellarparams.acquire", "download SSPP labels and SDSS DR12 spectra"),
    "simulate": ("stellarparams.simulate", "simulate an SDSS-like survey from the MILES stars"),
    "prepare": ("stellarparams.prepare", "turn spectra + label catalog into a prepared dataset"),
    "train": ("stellarparams.train", "train the residual multitask network"),
    "tune": ("stellarparams.tune", "Bayesian hyperparameter search (Optuna)"),
    "evaluate": ("stellarparams.evaluate", "metrics, tables and figures for a model"),
    "benchmark": ("stellarparams.benchmark", "the paper's baselines and ablations on one split"),
    "predict": ("stellarparams.predict", "run a model on new spectra"),
    "diagnose": ("stellarparams.diagnose", "how unlike a model's training spectra a set of spectra is, and where"),
    "run": ("stellarparams.pipeline", "main job: simulate, prepare, train, evaluate, and compare with a Ridge baseline"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help once: not when the help already gives a default,
    not for required options, flags or options without a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: {action.default})"


def build_parser(argv):
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="stellarparams",
        description="Estimate Teff, [Fe/H] and log g of stars from SDSS optical spectra "
        "with a residual multitask neural network (arXiv:2606.13868).",
        epilog="Run `stellarparams COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"stellarparams {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=HelpFormatter)
        # only the chosen command's module is imported (keeps --help fast)
        if name == chosen:
            importlib.import_module(modname).add_arguments(p)
            p.set_defaults(_module=modname)
    return parser


def check_options(args) -> None:
    """Check the options every command shares, before any work starts.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options; only those present are checked.

    Raises
    ------
    ValueError
        One line naming the option, the value and what is allowed.
    """
    def value(name):
        return getattr(args, name, None)

    for name, low in (("batch_size", 1), ("epochs", 1), ("ensemble", 1), ("trials", 1), ("threads", 1), ("n", 1),
                      ("workers", 0), ("calib_folds", 0), ("concurrency", 1), ("retries", 0)):
        v = value(name)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')} {v}: must be at least {low}")
    if value("fractions") is not None:
        from .config import parse_fractions

        parse_fractions(args.fractions)
    if value("grid") is not None:
        from .dataset import parse_grid

        n = parse_grid(args.grid).n_pix
        if n > MAX_GRID_PIXELS:
            raise ValueError(f"--grid {args.grid}: {n:,} pixels is more than the {MAX_GRID_PIXELS:,} allowed "
                             "(survey spectra have 4,000-8,000); choose a smaller N")
    if value("device") is not None:
        from .devices import resolve_device

        resolve_device(args.device)


def exit_code(e: BaseException):
    """The exit code for an exception a command raised, and the one line to print; (None, None) for a bug.

    Parameters
    ----------
    e : BaseException

    Returns
    -------
    (int, str) or (None, None)
    """
    from .files import DISK_ERRNOS, OutputBusy
    from .spectrum import NoUsableInput

    if isinstance(e, OutputBusy):
        return EXIT_BUSY, str(e)
    if isinstance(e, NoUsableInput):
        return EXIT_NOTHING_USABLE, str(e)
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return EXIT_BAD_INPUT, (f"{e.filename or 'the output'}: cannot write ({DISK_ERRNOS[e.errno]}); nothing half-written was "
                                "kept: free space (or choose another output) and run the same command again to "
                                "resume")
    if isinstance(e, OSError) and e.filename and e.strerror:
        return EXIT_BAD_INPUT, f"{e.filename}: {e.strerror}"
    if isinstance(e, (ValueError, OSError, ImportError)):  # ImportError: an optional dependency is missing
        return EXIT_BAD_INPUT, str(e)
    return None, None


def _interrupt_on_sigterm():
    """SIGTERM raises KeyboardInterrupt in the main thread, so the same clean-up runs as for Ctrl-C
    (worker processes killed, temporary files removed); returns the previous handler."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated (signal {signum}); re-run the same command to resume")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test calling main() from a thread)
        return None


def _quiet_stdout():
    """After a broken pipe (``| head -1``): send what is left of stdout nowhere, without a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = _interrupt_on_sigterm()
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_module", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        check_options(args)
        module = importlib.import_module(args._module)
        return module.run_cli(args) or EXIT_DONE
    except BrokenPipeError:  # the reader of stdout left early (`| head -1`): not an error of ours
        _quiet_stdout()
        return EXIT_DONE
    except KeyboardInterrupt as e:  # a stage may say what was kept (str(e)); else the general advice
        print(str(e) or "interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code, line = exit_code(e)
        if code is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:  # what is still buffered (also after --help), while a broken pipe can still be caught
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        except (OSError, ValueError):
            pass


if __name__ == "__main__":
    sys.exit(main())
