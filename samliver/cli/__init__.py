"""The ``samliver`` command: ``samliver <command> [options]``.

Each command is the ``main(argv)`` of a module of this package (``samliver/cli/<command>.py``):
a thin view that parses options (the shared groups are in :mod:`samliver.cli.options`) and
calls the library. A command's module is imported only when it runs, so that
``samliver --help`` stays fast (torch is not imported for it).
"""

from __future__ import annotations

import importlib
import os
import sys

from ..util import SamliverError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch-sample": ("samliver.cli.fetch_sample", "download the real LiTS sample case and write it as NIfTI"),
    "download-checkpoint": ("samliver.cli.download_checkpoint", "download and verify official SAM / MedSAM checkpoints"),
    "info": ("samliver.cli.info", "summarise a CT volume (NIfTI, DICOM folder or .mrc)"),
    "embed": ("samliver.cli.embed", "compute and cache SAM image embeddings for a volume"),
    "segment": ("samliver.cli.segment", "segment one slice from a box or points"),
    "zero-shot": ("samliver.cli.zero_shot", "evaluate prompted SAM with simulated prompts"),
    "train": ("samliver.cli.train", "train a prompt-free head on cached embeddings"),
    "experiment": ("samliver.cli.experiment", "label-efficiency experiment: heads vs baselines vs K"),
    "predict": ("samliver.cli.predict", "segment a whole volume with a trained head"),
    "bench": ("samliver.cli.bench", "speed and memory benchmark (prints a table)"),
    "demo": ("samliver.cli.demo", "the main job on the sample case"),
    "results": ("samliver.cli.results", "rebuild docs/results.md from stored run records (--run computes missing ones)"),
    "app": ("samliver.app", "serve the Voila front end"),
    "annotate-sim": ("samliver.cli.annotate_sim", "simulated annotator: Dice vs slices labelled per strategy"),
    "embed-dataset": ("samliver.cli.embed_dataset", "encode every slice of a dataset folder (torchrun: sharded)"),
    "train-dataset": ("samliver.cli.train_dataset", "train a head on a dataset's volumes (torchrun: DDP)"),
    "make-phantom-dataset": ("samliver.cli.make_phantom_dataset", "write synthetic phantoms in the MSD layout"),
}


# Options every command that encodes slices understands, wherever they stand on the line: they
# choose how the frozen encoder runs (samliver.backends) and are passed on through the
# environment that get_model() reads, so no command has to re-declare them.
GLOBAL_OPTIONS = {
    "--backend": ("SAMLIVER_BACKEND", "encoder backend: auto (default), torch, onnxruntime, openvino"),
    "--precision": ("SAMLIVER_PRECISION", "encoder precision: auto (= fp32, exact), bf16, fp16 (GPU), int8 (openvino)"),
}


def _usage() -> str:
    width = max(max(map(len, COMMANDS)), max(len(o) + 2 for o in GLOBAL_OPTIONS))
    lines = ["usage: samliver <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options for every command that encodes slices:"]
    lines += [f"  {opt + ' X':<{width}}  {text}" for opt, (_, text) in GLOBAL_OPTIONS.items()]
    lines += ["", "Run `samliver <command> --help` for a command's options."]
    return "\n".join(lines)


def _take_global_options(argv: list[str]) -> list[str]:
    """Remove ``--backend X`` / ``--precision X`` (or ``--opt=X``) from ``argv`` into the environment.

    Raises:
        SamliverError: an option given without a value, or a value get_model will not accept.
    """
    from ..backends import BACKENDS, PRECISIONS

    allowed = {"--backend": ("auto", *BACKENDS), "--precision": ("auto", *PRECISIONS)}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        opt, eq, value = arg.partition("=")
        if opt in GLOBAL_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SamliverError(f"{opt} needs a value: one of {', '.join(allowed[opt])}.")
                value, i = argv[i + 1], i + 1
            if value not in allowed[opt]:
                raise SamliverError(f"{opt} {value!r} is not one of {', '.join(allowed[opt])}.")
            os.environ[GLOBAL_OPTIONS[opt][0]] = value
        else:
            rest.append(arg)
        i += 1
    return rest


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
        rest = _take_global_options(rest)
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
