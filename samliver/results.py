"""Measured results as stored run records, and ``docs/results.md`` rebuilt from them.

A *section* is one measurement (``zeroshot``: prompted SAM with prompts simulated from the
label, :func:`samliver.zero_shot.evaluate_zero_shot`; ``heads``: prompt-free heads and
baselines trained on K labelled slices, :func:`samliver.experiment.run_slices`, the grid of K x
heads x baselines x seeds x protocols; ``splits``: the best head against the baselines on the
random split families ``slab-random`` / ``sparse-random``, with wins / losses per split). Running a
section appends one JSON line per finished measurement to ``<results dir>/<section>.jsonl`` and
one line describing the run (command, commit, machine, wall time) to ``runs.jsonl``. A record
carries every setting that changes its figure (model, protocol, K, method or mode, seed,
steps, ``SAMLIVER_FAST``), so a rerun skips what is stored and computes only what is missing:
an interrupted run resumes where it stopped.

:func:`build_markdown` turns the records into a Markdown page (mean ± sd over seeds, with the
command, commit, machine and wall time of every run); ``earlier.md`` in the results folder, if
present, is appended verbatim: measurements made before records were kept. Every file is
written atomically (temporary file, then rename), records included.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from .config import DEFAULT_K, FIXED_PROTOCOLS, PROTOCOLS, RANDOM_PROTOCOLS
from .util import SamliverError, atomic_write_text, fast_mode

if TYPE_CHECKING:  # pragma: no cover
    from .io import CTVolume
    from .models import SamModel

SECTIONS: dict[str, str] = {
    "zeroshot": "Zero-shot prompted SAM (prompts simulated from the reference label)",
    "heads": "Prompt-free heads and baselines on K labelled slices",
    "splits": "Split robustness: the best head against the baselines on random splits",
}
"""Sections ``samliver results --run`` can compute, in page order, with their headings."""

DEFAULT_RESULTS_DIR = "results"
DEFAULT_OUTPUT = "docs/results.md"
RUNS_FILE = "runs.jsonl"
EARLIER_FILE = "earlier.md"

# Environment variables that change what a run measures or how fast; recorded with each run.
_ENV_KEYS = ("SAMLIVER_FAST", "SAMLIVER_THREADS", "SAMLIVER_BACKEND", "SAMLIVER_PRECISION",
             "OMP_NUM_THREADS")

# The fields that identify one measurement: a stored record with the same values is not rerun.
_KEYS = {
    "zeroshot": ("model", "protocol", "k", "mode", "seed", "jitter"),
    "heads": ("model", "protocol", "k", "method", "seed", "split", "steps", "fast", "epochs"),
    "splits": ("model", "protocol", "k", "method", "seed", "split", "steps", "fast", "epochs"),
}

FULL_STUDY = ("samliver results --run zeroshot,heads,splits --k 1,2,4,8,16 "
              "--heads linear,cnn,vit,autosam,default,fine --split-heads default,fine "
              "--baselines unet,ssl,nnunet,zeroshot --seeds 0,1,2 --splits 10 --device cuda")
"""The one command of the whole study (every section, the issue's grid: the four head kinds, the
``default`` recipe and ``fine``, the recipe with the encoder's finer stage, docs/heads.md); it
resumes."""


def parse_sections(text: str | None) -> list[str]:
    """The section names of a comma list such as ``"zeroshot,heads"`` (empty or None: none).

    Args:
        text: comma-separated section names.

    Returns:
        The names, in the order given, without duplicates.

    Raises:
        SamliverError: a name that is not a section.
    """
    names = list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        raise SamliverError(f"Unknown results section {', '.join(map(repr, bad))}: choose from "
                            f"{', '.join(SECTIONS)} (comma-separated, e.g. --run zeroshot,heads).")
    return names


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per line ([] when the file does not exist).

    Raises:
        SamliverError: a line that is not a JSON object (the message names file and line).
    """
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise SamliverError(f"{path}:{i} is not a JSON line ({err.msg}): fix or delete that "
                                "line, then rerun.") from err
        if not isinstance(item, dict):
            raise SamliverError(f"{path}:{i} is not a JSON object: fix or delete that line.")
        out.append(item)
    return out


def append_jsonl(path: str | os.PathLike, items: list[dict]) -> None:
    """Append ``items`` to a JSON-lines file, rewriting it atomically (the files are small).

    A crash leaves either the old file or the new one, never a half-written line. Runs in
    parallel (e.g. one process per protocol) take turns: the read-and-rewrite holds a lock on
    the folder, so no process drops another's line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write_text(path, old + "".join(json.dumps(i, sort_keys=True) + "\n" for i in items))


def upsert_jsonl(path: str | os.PathLike, item: dict, key: str) -> None:
    """Replace the line whose ``key`` equals ``item[key]`` by ``item``, or append it (atomically, locked)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        items = [i for i in read_jsonl(path) if i.get(key) != item[key]] + [item]
        atomic_write_text(path, "".join(json.dumps(i, sort_keys=True) + "\n" for i in items))


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` itself (no lock file is left behind); none on Windows."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, runs must not overlap
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_key(section: str, record: dict) -> tuple:
    """The values that identify one measurement of ``section`` (see ``_KEYS``)."""
    return tuple(record.get(k) for k in _KEYS[section])


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """``git rev-parse --short HEAD`` (with ``+dirty`` for uncommitted changes), or None outside git."""
    try:
        kw: dict[str, Any] = dict(cwd=cwd, capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **kw)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **kw)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """CPU model, core count, load average, Python, torch and the samliver environment variables."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a dependency
        torch_version, gpu = None, None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch_version,
            "python": platform.python_version(), "load_1min": None if load is None else round(load, 2),
            "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_section(section: str, volume: CTVolume, model: SamModel, *,
                results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR,
                protocols: tuple[str, ...] | list[str] | None = None, ks: list[int] | None = None,
                seeds: list[int] | None = None, heads: list[str] | None = None,
                baselines: list[str] | None = None, modes: list[str] | None = None,
                steps: int | None = None, jitter: float = 0.0, command: str | None = None,
                note: str | None = None, volume_name: str | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None, splits: int = 10,
                nnunet_epochs: int | None = None) -> dict:
    """Compute the records of ``section`` that ``results_dir`` does not hold yet, and store them.

    Each finished measurement is appended to ``<results_dir>/<section>.jsonl`` at once, so an
    interrupted run keeps what it measured and the next one resumes.

    Args:
        section: ``"zeroshot"``, ``"heads"`` or ``"splits"``.
        volume: a labelled CT volume (the sample case for the published tables).
        model: the SAM model whose frozen encoder is used.
        results_dir: the folder of the JSON-lines records (created if missing).
        protocols: sample protocols to run (default: ``sparse`` and ``slab``; for ``splits``
            ``slab-random`` and ``sparse-random``).
        ks: labelled slices per run (default ``[8]``); for ``zeroshot`` it fixes the sparse
            protocol's test slices.
        seeds: seeds (default ``[0]``).
        heads: head kinds or recipe names (``experiment.HEAD_METHODS``; default ``["cnn"]``,
            for ``splits`` ``["default"]``, the best recipe).
        baselines: names of ``experiment.BASELINES`` for ``heads`` / ``splits`` (default none);
            ``zeroshot`` runs prompted SAM's baseline modes once per split (K 0, seed 0).
        modes: zero-shot prompt modes (default all of :data:`samliver.zero_shot.MODES`).
        steps: training steps for ``heads`` (default: each method's recipe).
        jitter: box jitter in pixels for ``zeroshot`` (default 0: tight boxes).
        command: the command line to store with the run (default: a Python call).
        note: free text stored with the run (e.g. that the machine was shared).
        volume_name: how the run names the volume (default: the file name of its source).
        progress: show progress bars.
        log: called with one line per measurement started (default: nothing).
        splits: random protocols: split seeds ``0 .. splits - 1`` (default 10).
        nnunet_epochs: nnU-Net's budget in epochs (default ``nnunet.NNUNET_EPOCHS``); part of
            an nnU-Net record's key, so each budget is its own measurement.

    Returns:
        The run's description as stored in ``runs.jsonl``: ``run_id, section, command, commit,
        machine, started, wall_s, n_new, n_skipped, finished``.

    Raises:
        SamliverError: an unknown section, protocol, head, baseline or mode, or a volume
            without a label.
    """
    from .experiment import BASELINES, HEAD_METHODS, run_slices
    from .zero_shot import BASELINE_MODES, MODES, evaluate_zero_shot

    parse_sections(section)
    if volume.label is None:
        raise SamliverError(f"{volume.source} has no label: results need a labelled volume (pass --label).")
    if protocols is None:
        protocols = RANDOM_PROTOCOLS if section == "splits" else FIXED_PROTOCOLS
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise SamliverError(f"Unknown protocol {bad}: choose from {', '.join(PROTOCOLS)}.")
    if splits < 1:
        raise SamliverError(f"The number of splits must be >= 1, got {splits}.")
    ks = list(ks or [DEFAULT_K])
    seeds = list(seeds if seeds is not None else [0])
    heads = list(heads if heads is not None else (["default"] if section == "splits" else ["cnn"]))
    baselines = list(baselines or [])
    bad = [h for h in heads if h not in HEAD_METHODS] + [b for b in baselines if b not in BASELINES]
    modes = list(modes or MODES)
    bad += [m for m in modes if m not in MODES] if section == "zeroshot" else []
    if bad:
        raise SamliverError(f"Unknown method(s) {bad}: heads {', '.join(HEAD_METHODS)}; baselines "
                            f"{', '.join(BASELINES)}; zero-shot modes {', '.join(MODES)}.")
    say = log or (lambda _msg: None)

    results_dir = Path(results_dir)
    path = results_dir / f"{section}.jsonl"
    done = {record_key(section, r) for r in read_jsonl(path)}
    run_id = uuid.uuid4().hex[:12]
    info = {"run_id": run_id, "section": section, "command": command or f"samliver.results.run_section({section!r}, ...)",
            "commit": git_commit(), "machine": machine_info(), "started": _now(), "note": note,
            "volume": volume_name or Path(str(volume.source)).name, "model": model.name,
            "backend": f"{getattr(model, 'backend', '?')}/{getattr(model, 'precision', '?')}"}
    t0 = time.perf_counter()
    fast = fast_mode()
    base = {"model": model.name, "run_id": run_id}
    n_new = n_skipped = 0

    def store(rec: dict) -> None:
        nonlocal n_new
        append_jsonl(path, [rec])
        done.add(record_key(section, rec))
        n_new += 1
        # The run's description is stored with its first record and kept up to date, so the
        # records of a run that is interrupted still say which command and machine made them.
        info.update(wall_s=round(time.perf_counter() - t0, 1), n_new=n_new, n_skipped=n_skipped,
                    finished=False)
        upsert_jsonl(results_dir / RUNS_FILE, info, "run_id")

    def stored_meanwhile(key: dict) -> bool:
        """Whether another run (e.g. a parallel process) has stored this measurement since we started."""
        return record_key(section, key) in {record_key(section, r) for r in read_jsonl(path)}

    from .datasets import protocol_split
    from .embeddings import embed_volume

    emb = None  # embedded once, only if a head or baseline is left to run
    for protocol in protocols:
        for k in ks:
            if section == "zeroshot":
                for seed in seeds:
                    todo = [m for m in modes if record_key(section, {
                        **base, "protocol": protocol, "k": k, "mode": m, "seed": seed,
                        "jitter": float(jitter)}) not in done]
                    n_skipped += len(modes) - len(todo)
                    if not todo:
                        continue
                    test = protocol_split(volume.label, protocol, k=k)[1]
                    for mode in todo:  # one mode per call, so each is stored when it finishes
                        if stored_meanwhile({**base, "protocol": protocol, "k": k, "mode": mode,
                                             "seed": seed, "jitter": float(jitter)}):
                            n_skipped += 1
                            continue
                        say(f"zeroshot {protocol} K={k} seed {seed}: {mode}")
                        rows = evaluate_zero_shot(volume, model, test, modes=[mode], progress=progress,
                                                  jitter=jitter, seed=seed)
                        for row in rows:
                            store({**base, **row, "protocol": protocol, "k": k, "seed": seed,
                                   "jitter": float(jitter), "test_slices": [test[0], test[-1]]})
            else:
                for split in (range(splits) if protocol in RANDOM_PROTOCOLS else [None]):
                    for method in heads + baselines:
                        # Zero-shot needs no labelled slice: one run (k 0, seed 0, every
                        # baseline mode) per split, at the first K.
                        zs = method == "zeroshot"
                        if zs and k != ks[0]:
                            continue
                        for seed in ([0] if zs else seeds):
                            key = {**base, "protocol": protocol, "k": 0 if zs else k, "method": method,
                                   "seed": seed, "split": split, "steps": steps, "fast": fast}
                            if method == "nnunet":  # the budget is part of what was measured
                                from .nnunet import NNUNET_EPOCHS

                                key["epochs"] = nnunet_epochs or NNUNET_EPOCHS["fast" if fast else "full"]
                            wanted = ([{**key, "method": f"zeroshot:{m}"} for m in BASELINE_MODES]
                                      if zs else [key])
                            if all(record_key(section, w) in done or stored_meanwhile(w) for w in wanted):
                                n_skipped += 1
                                continue
                            say(f"{section} {protocol} K={k}{'' if split is None else f' split {split}'} "
                                f"{method} seed {seed}")
                            if emb is None:  # every slice, once: the cache serves each split
                                emb = embed_volume(volume, model, progress=progress)
                            is_head = method in HEAD_METHODS
                            recs = run_slices(volume, model, emb, protocol=protocol, ks=[k],
                                              heads=[method] if is_head else [],
                                              baselines=[] if is_head else [method], seeds=[seed],
                                              steps=steps, progress=False, nnunet_epochs=key.get("epochs"),
                                              splits=None if split is None else [split])
                            for rec in recs:
                                store({**rec, **key, "method": rec["method"]})
    info.update(wall_s=round(time.perf_counter() - t0, 1), n_new=n_new, n_skipped=n_skipped,
                finished=True)
    if n_new:
        upsert_jsonl(results_dir / RUNS_FILE, info, "run_id")
    return info


# ----------------------------------------------------------------------------- the page


def _mean_sd(values: list[float | None]) -> str:
    vals = [float(v) for v in values if v is not None and np.isfinite(float(v))]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _runs_table(runs: list[dict]) -> list[str]:
    lines = ["| when | command | commit | machine | wall | note |", "|---|---|---|---|---|---|"]
    for r in runs:
        m = r.get("machine") or {}
        env = " ".join(f"{k}={v}" for k, v in sorted((m.get("env") or {}).items()))
        cmd = f"{env} {r.get('command', '')}".strip()
        machine = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
        machine += f", {m['gpu']}" if m.get("gpu") else ""
        machine += f", torch {m.get('torch', '?')}, encoder {r.get('backend', '?')}"
        machine += f", load {m['load_1min']} at start" if m.get("load_1min") is not None else ""
        wall = f"{r.get('wall_s', 0):.0f} s" if r.get("wall_s") is not None else "?"
        if r.get("finished") is False:
            wall += " (interrupted; until its last record)"
        lines.append(f"| {r.get('started', '?')} | `{cmd}` | {r.get('commit') or '?'} | {machine} | "
                     f"{wall} | {r.get('note') or ''} |")
    return lines


def _zeroshot_table(records: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("model"), r["protocol"], r["k"], r.get("jitter", 0.0), r["mode"]), []).append(r)
    lines = ["| model | protocol (test slices) | box jitter | mode | liver Dice | tumour Dice | "
             "prompts | ms / prompt | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    from .zero_shot import MODES

    order = {m: i for i, m in enumerate(MODES)}
    for (model, protocol, k, jitter, mode), rs in sorted(
            groups.items(), key=lambda t: (str(t[0][0]), t[0][1], t[0][2], t[0][3], order.get(t[0][4], 99))):
        span = rs[0].get("test_slices")
        where = f"{protocol}" + (f" K={k}" if protocol == "sparse" else "")
        where += f" (z {span[0]}–{span[1]}, {rs[0].get('n_slices', '?')} slices)" if span else ""
        ms = np.mean([r["ms_per_prompt"] for r in rs if r.get("ms_per_prompt") is not None] or [np.nan])
        lines.append(f"| {model} | {where} | {jitter:g} px | `{mode}` | {_mean_sd([r.get('liver_dice') for r in rs])} | "
                     f"{_mean_sd([r.get('tumour_dice') for r in rs])} | {rs[0].get('n_prompts', '?')} | "
                     f"{ms:.0f} | {len({r['seed'] for r in rs})} |")
    return lines


def _split_values(rs: list[dict], metric: str) -> list[float | None]:
    """A metric's values: per run for a fixed split; per split (mean over its seeds) for a random protocol."""
    if all(r.get("split") is None for r in rs):
        return [r.get(metric) for r in rs]
    by_split: dict[Any, list[float]] = {}
    for r in rs:
        if r.get(metric) is not None:
            by_split.setdefault(r.get("split"), []).append(float(r[metric]))
    return [float(np.mean(v)) for v in by_split.values()]


def _heads_table(records: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        # nnU-Net's budget is part of what a row means: one row per epochs x iterations.
        groups.setdefault((r.get("model"), r["protocol"], r["k"], r["method"], r.get("steps"),
                           r.get("fast"), r.get("epochs"), r.get("iterations")), []).append(r)
    lines = ["| model | protocol | K | method | steps | liver Dice | tumour Dice | seeds | "
             "s / run (median) | splits |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, protocol, k, method, steps, fast, epochs, iterations), rs in sorted(
            groups.items(), key=lambda t: tuple(str(v).zfill(6) if isinstance(v, int) else str(v)
                                                for v in t[0])):
        secs = [r["seconds"] for r in rs if r.get("seconds") is not None]
        step_txt = (f"{epochs} epochs x {iterations}" if epochs is not None
                    else "recipe" if steps is None else str(steps)) + (" (FAST)" if fast else "")
        sec_txt = f"{np.median(secs):.0f}" if secs else "—"
        n_splits = len({r.get("split") for r in rs if r.get("split") is not None})
        lines.append(f"| {model} | {protocol} | {k} | `{method}` | {step_txt} | "
                     f"{_mean_sd(_split_values(rs, 'liver_dice'))} | "
                     f"{_mean_sd(_split_values(rs, 'tumour_dice'))} | {len({r['seed'] for r in rs})} | "
                     f"{sec_txt} | {n_splits or '—'} |")
    return lines


def _splits_table(records: list[dict]) -> list[str]:
    from .experiment import wins_table

    lines = _heads_table(records)
    wins = wins_table(records)
    if wins:
        lines += ["", "Wins / losses per split: on how many splits the head's Dice (mean over its "
                  "seeds on that split) is higher / lower / equal than the baseline's.", "",
                  *wins.rstrip("\n").splitlines()]
    return lines


_TABLES = {"zeroshot": _zeroshot_table, "heads": _heads_table, "splits": _splits_table}

_INTRO = {
    "zeroshot": (
        "LiteMedSAM (or the model named) prompted with prompts simulated from the reference label, "
        "on the test slices of each sample protocol: the best a careful user gets from each kind of "
        "prompt, not an automatic method. Dice over the test slices as one 3D region (liver = "
        "label ≥ 1, tumour = label 2); `—` where a mode does not prompt that structure."),
    "heads": (
        "Prompt-free heads on the frozen encoder's cached embeddings (and, when run, UNet "
        "baselines trained from scratch in image space), trained on the K labelled slices of "
        "each protocol and scored by global Dice over the protocol's test slices after "
        "post-processing. Mean ± sample sd over seeds (a seed changes initialisation, batch "
        "order and augmentation; the split is fixed). Seconds per run include training and "
        "prediction. `default` is the best recipe (`config.RECIPES['default']`), chosen on the "
        "fixed protocols before any random split was drawn. The figure below plots Dice against K "
        "(mean and sd band)."),
    "splits": (
        "Does the comparison hold on other splits? The random split families of docs/design.md "
        "(`slab-random`: a random labelled block of the liver and a disjoint test block 8 slices "
        "away; `sparse-random`: the K evenly spaced slices at a random offset), split seeds "
        "0 … N−1. Each split's seeds are averaged, then mean ± sample sd is over the splits. "
        "Recipes are the fixed ones: nothing was tuned on these test slices."),
}


def build_markdown(results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, *,
                   results_label: str | None = None, figure: str | None = None) -> str:
    """The results page: every section with stored records, then ``earlier.md`` verbatim.

    Args:
        results_dir: the folder holding ``<section>.jsonl``, ``runs.jsonl`` and ``earlier.md``.
        results_label: how the page names that folder (default: ``results_dir`` as given).
        figure: the Dice-vs-K figure's path relative to the page, shown in the ``heads``
            section (default: none).

    Returns:
        The Markdown text.

    Raises:
        SamliverError: a records file with a line that is not a JSON object.
    """
    results_dir = Path(results_dir)
    label = results_label or str(results_dir)
    runs = read_jsonl(results_dir / RUNS_FILE)
    out = [
        "# Measured results",
        "",
        f"This page is generated by `samliver results` from the run records in `{label}/` "
        "(one JSON line per measurement; `runs.jsonl` says which command, commit and machine "
        "made them). Do not edit it by hand:",
        "",
        "- `samliver results` rebuilds it from the stored records (runs nothing);",
        "- `samliver results --run zeroshot,heads` first computes the records that are missing "
        "(records already stored are skipped, so an interrupted run resumes), then rebuilds it;",
        "- options choose what a run covers: `--protocol`, `--k`, `--seeds`, `--heads`, "
        "`--baselines`, `--steps`, `--splits`, `--split-k`, `--split-heads` (see "
        "`samliver results --help`);",
        f"- the whole study (K 1–16 × every head, the best recipe and `fine` × every baseline × seeds "
        f"0–2 × both protocols, and 10 random splits of each family) is one command, for a GPU: "
        f"`{FULL_STUDY}`. It resumes, so it can be stopped and rerun; each section below says "
        "what was run here.",
        "",
        f"Built {_now()}, commit {git_commit() or 'unknown'}. Timings depend on the machine's "
        "load: each run's load average at its start is listed with it.",
        "",
    ]
    machines = sorted({f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores"
                       + (f", {m['gpu']}" if m.get("gpu") else "") + f", torch {m.get('torch', '?')})"
                       for m in (r.get("machine") or {} for r in runs)})
    if machines:
        out[-2] += f" Measured on {'; '.join(machines)}."
    volumes = sorted({str(r.get("volume")) for r in runs})
    if volumes == ["sample"]:
        out[-2] += (" All figures come from one real LiTS case (the sample, 128³ around the liver, "
                    "spacing unknown) with the sample protocols of docs/design.md (two fixed splits, and "
                    "families of random splits for the splits section): they show how the method "
                    "behaves and how to measure it, not how it generalises to other patients.")
    elif volumes:
        out[-2] += f" Volumes: {', '.join(volumes)}."
    for section, title in SECTIONS.items():
        records = read_jsonl(results_dir / f"{section}.jsonl")
        out += [f"## {title}", ""]
        if not records:
            out += [f"No stored records: `samliver results --run {section}` computes them.", ""]
            continue
        what = "mode" if section == "zeroshot" else "method"

        seen = {f: ", ".join(sorted({str(r.get(f)) for r in records})) for f in ("protocol", "k", what, "seed")}
        out += [_INTRO[section], "",
                f"Stored: {len(records)} records; protocols {seen['protocol']}; K {seen['k']}; "
                f"{what}s {seen[what]}; seeds {seen['seed']}. Anything else (other K, "
                f"{what}s or seeds) was not run by this command.", "",
                "Runs that made these records:", ""]
        ids = {r.get("run_id") for r in records}
        out += _runs_table([r for r in runs if r.get("run_id") in ids and r.get("section") == section])
        out += ["", *_TABLES[section](records), ""]
        if section == "heads" and figure:
            out += [f"![Dice against K per method, mean and sd band over seeds]({figure})", ""]
    earlier = results_dir / EARLIER_FILE
    if earlier.exists():
        out += [earlier.read_text().rstrip(), ""]
    return "\n".join(out)


def write_markdown(output: str | os.PathLike = DEFAULT_OUTPUT,
                   results_dir: str | os.PathLike = DEFAULT_RESULTS_DIR, **kwargs: Any) -> Path:
    """Build the page (:func:`build_markdown`) and write it atomically to ``output``.

    When the ``heads`` section has records, the Dice-vs-K figure
    (``visualization.label_efficiency_figure``) is written next to the page, as ``output``
    with the suffix ``.png``, and shown in it.

    Raises:
        SamliverError: ``output`` is one of the records files (never overwrite an input).
    """
    output, results_dir = Path(output), Path(results_dir)
    inputs = [results_dir / f"{s}.jsonl" for s in SECTIONS] + [results_dir / RUNS_FILE,
                                                               results_dir / EARLIER_FILE]
    figure = output.with_suffix(".png")
    if any(p.resolve() in {q.resolve() for q in inputs} for p in (output, figure)):
        raise SamliverError(f"--output {output} is one of the records it is built from: choose "
                            "another file (default docs/results.md).")
    heads = read_jsonl(results_dir / "heads.jsonl")
    if heads:
        from .experiment import summarise
        from .visualization import label_efficiency_figure, save_figure

        rows = summarise([{**r, "method": r["method"] + (" (FAST)" if r.get("fast") else "")}
                          for r in heads])
        output.parent.mkdir(parents=True, exist_ok=True)
        save_figure(label_efficiency_figure(rows), figure, dpi=100)
        kwargs.setdefault("figure", figure.name)
    return atomic_write_text(output, build_markdown(results_dir, **kwargs))


def command_line(argv: list[str]) -> str:
    """``samliver results ...`` as typed (quoted for a shell), for the run records."""
    return "samliver results " + shlex.join(argv) if argv else "samliver results"
