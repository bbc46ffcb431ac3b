"""The `stellarparams` command: a thin layer over the library.

Each subcommand lives in the module of its pipeline stage, which defines
`add_arguments(parser)` and `run_cli(args) -> int`. Modules are imported only when
their subcommand runs, so `stellarparams --help` stays fast.
"""
import argparse
import importlib
import sys

from . import __version__

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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return module.run_cli(args) or 0
    except KeyboardInterrupt as e:  # a stage may say what was kept (str(e)); else the general advice
        print(str(e) or "interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
