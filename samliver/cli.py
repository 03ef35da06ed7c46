"""The ``samliver`` command: ``samliver <command> [options]``.

Each command is the ``main(argv)`` of the module that does the work, imported only when
called so that ``samliver --help`` stays fast (torch is not imported for it).
"""

from __future__ import annotations

import importlib
import sys

from .util import SamliverError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-sample": ("samliver.sample", "download the real LiTS sample case and write it as NIfTI"),
    "info": ("samliver.io", "summarise a CT volume (NIfTI, DICOM folder or .mrc)"),
    "embed": ("samliver.embeddings", "compute and cache SAM image embeddings for a volume"),
    "segment": ("samliver.prompt_based_segmentation", "segment one slice from a box or points"),
    "zero-shot": ("samliver.zero_shot", "evaluate prompted SAM with simulated prompts"),
    "train": ("samliver.training", "train a prompt-free head on cached embeddings"),
    "experiment": ("samliver.experiment", "label-efficiency experiment: heads vs baselines vs K"),
    "predict": ("samliver.inference", "segment a whole volume with a trained head"),
    "bench": ("samliver.bench", "speed and memory benchmark (prints a table)"),
    "demo": ("samliver.demo", "the main job on the sample case"),
    "app": ("samliver.app", "serve the Voila front end"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: samliver <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `samliver <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's ``main``; user errors print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"samliver: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SamliverError as err:
        return _fail(name, str(err))
    except OSError as err:
        # A file-system refusal (permissions, disk full, a vanished file) is the user's to fix,
        # and a traceback would hide the one fact that matters: which path and why.
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return _fail(name, f"{err.strerror or err}{where}. Check that the path exists and is "
                           "writable, and that the disk has space.")
    except KeyboardInterrupt:
        print(f"samliver {name}: interrupted", file=sys.stderr)
        return 130


def _fail(name: str, message: str) -> int:
    """Print ``message`` as one line (a user error never spans lines) and return exit code 2."""
    print(f"samliver {name}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
