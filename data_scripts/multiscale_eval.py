"""Multi-scale encoder features for the ``default`` cnn head: a prototype and its evaluation
(docs/heads.md, "Multi-scale encoder features").

LiteMedSAM's TinyViT has one stage finer than the 64 x 64 embedding: ``layers.0``, 128
channels on a 128 x 128 grid (stride 2 of the 256 px model input). This script

1. computes the stage outputs of every slice of the sample (forward hooks on
   ``model.image_encoder.layers[0]`` and ``layers[2]``, the preprocessing of ``embed_volume``)
   into a side file ``$SAMLIVER_HOME/multiscale/<cache key hash>/`` (float16, 4 MB + 2.5 MB a
   slice), never into the embedding cache;
2. trains the ``default`` recipe with these options and scores them like
   ``data_scripts/heads_eval.py`` (K = 8, protocols sparse and slab, seeds 0-2):

   - ``base``: the ``default`` recipe as it is;
   - ``fine``: + a skip from ``layers.0``: 1x1 conv 128 -> 32 channels, GroupNorm, GELU,
     concatenated where the decoder reaches 128 px (the transposed-conv output and the image
     skip, before the fuse block; the refinement block at ``refine_size = 128`` follows);
   - ``l2``: ``layers.2`` (320 x 64 x 64, standardised per channel to the embedding's scale)
     concatenated with the embedding (576 input channels);
   - ``fine+l2``: both;
   - ``fine-lib``: ``fine`` as the library runs it (recipe ``fine``), to check the integration.

The head is a subclass defined here, not a library option: the ``layers.0`` features travel to
it packed behind the image (``(N, 1 + 128, S, S)``, nearest-upsampled x2, so the flips and
rotations of ``augment_batch`` stay exact), and ``samliver.training.build_head`` is patched in
this process only. Records: one JSON line per run (``val``: train on 6 of the 8 labelled
slices, score the 2 held out, no post-processing; ``test``: train on all 8, score the
protocol's test slices after post-processing), resumable.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python data_scripts/multiscale_eval.py --features
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python data_scripts/multiscale_eval.py \
        --protocols sparse --out results/multiscale_sparse.jsonl
    python data_scripts/multiscale_eval.py --summary results/multiscale_*.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

# The same scoring and validation slots as the heads study (this folder is on sys.path when a
# script here runs): the two tables are comparable by construction.
from heads_eval import VAL_SLOTS, _score, fmt, read_groups  # noqa: E402
from torch import nn
from torch.nn import functional as F

import samliver.training as training
from samliver.checkpoints import model_info
from samliver.datasets import protocol_split
from samliver.embeddings import cache_key, embed_volume
from samliver.heads import CNNHead, build_head, predict_logits
from samliver.models import get_model
from samliver.preprocess import window_to_unit
from samliver.sample import load_sample
from samliver.training import recipe, train_head
from samliver.training_data import slice_tensors
from samliver.util import cache_dir

OPTIONS = {
    "base": {"fine": False, "l2": False},
    "fine": {"fine": True, "l2": False},
    "l2": {"fine": False, "l2": True},
    "fine+l2": {"fine": True, "l2": True},
    # The library's version of "fine": recipe "fine" (cnn fine_features=128),
    # embeddings.embed_fine_features, train_head(fine=), predict_probabilities.
    "fine-lib": {"fine": False, "l2": False, "library": True},
}
FINE_CH, L2_CH = 128, 320


# ---------------------------------------------------------------- features (side file)

def feature_folder(volume, model) -> Path:
    """``$SAMLIVER_HOME/multiscale/<hash of the embedding cache key + stages>``."""
    key = dict(cache_key(volume, model), stages=["layers.0", "layers.2"], torch_encoder=True)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_dir("multiscale", h)
    (folder / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
    return folder


def compute_features(volume, model, batch: int = 4) -> Path:
    """Write ``layers0.npy`` (Z,128,128,128) and ``layers2.npy`` (Z,320,64,64) float16; returns the folder."""
    folder = feature_folder(volume, model)
    done = folder / "done"
    if done.exists():
        return folder
    depth = volume.hu.shape[0]
    key = cache_key(volume, model)
    lo, hi = key["window"]
    enc = model.image_encoder.float().eval()
    outs: dict = {}
    hooks = [enc.layers[i].register_forward_hook(lambda mod, inp, out, i=i: outs.__setitem__(i, out))
             for i in (0, 2)]
    l0 = np.lib.format.open_memmap(folder / "layers0.npy.tmp", "w+", np.float16, (depth, FINE_CH, 128, 128))
    l2 = np.lib.format.open_memmap(folder / "layers2.npy.tmp", "w+", np.float16, (depth, L2_CH, 64, 64))
    t0 = time.time()
    try:
        for s in range(0, depth, batch):
            zs = list(range(s, min(depth, s + batch)))
            x = torch.stack([model.prepare(window_to_unit(volume.hu[z], (lo, hi))) for z in zs])
            with torch.no_grad():
                enc(x)
            b = len(zs)
            # TinyViT stages return tokens (B, H*W, C), row-major over the grid.
            l0[s:s + b] = outs[0].view(b, 128, 128, FINE_CH).permute(0, 3, 1, 2).numpy().astype(np.float16)
            l2[s:s + b] = outs[2].view(b, 64, 64, L2_CH).permute(0, 3, 1, 2).numpy().astype(np.float16)
            print(f"features {s + b}/{depth} {time.time() - t0:.0f} s", flush=True)
    finally:
        for h in hooks:
            h.remove()
    l0.flush(), l2.flush()
    del l0, l2
    os.replace(folder / "layers0.npy.tmp", folder / "layers0.npy")
    os.replace(folder / "layers2.npy.tmp", folder / "layers2.npy")
    done.write_text(f"{time.time() - t0:.1f} s for {depth} slices, 1 torch thread\n")
    return folder


class Features:
    """The side-file features of one volume, and the tensors each option feeds the head."""

    def __init__(self, folder: Path, embeddings) -> None:
        self.l0 = np.load(folder / "layers0.npy", mmap_mode="r")
        self.l2 = np.load(folder / "layers2.npy", mmap_mode="r")
        # layers.2 standardised per channel, then scaled to the embedding's overall sd, so the
        # head's first 1x1 conv sees both inputs at one scale.
        l2 = np.asarray(self.l2, np.float32)
        self.l2_mean = l2.mean(axis=(0, 2, 3), keepdims=True)[0]
        self.l2_std = l2.std(axis=(0, 2, 3), keepdims=True)[0] + 1e-6
        self.emb_sd = float(np.asarray(embeddings.stack(list(range(0, len(self.l2), 8))), np.float32).std())

    def emb(self, emb: np.ndarray, zs: list[int], l2: bool) -> np.ndarray:
        if not l2:
            return emb
        x = (np.asarray(self.l2[zs], np.float32) - self.l2_mean) / self.l2_std * self.emb_sd
        return np.concatenate([emb, x.astype(np.float32)], axis=1)

    def images(self, images: np.ndarray, zs: list[int], fine: bool) -> np.ndarray:
        if not fine:
            return images
        f = torch.from_numpy(np.asarray(self.l0[zs], np.float32))
        # nearest x2 to the model-input frame: flips / rot90 of the packed tensor are then
        # exactly the flips / rot90 of the 128 px map (the head average-pools it back).
        f = F.interpolate(f, scale_factor=2, mode="nearest").numpy()
        return np.concatenate([images[:, None], f], axis=1)


# ---------------------------------------------------------------- the head

class FineCNNHead(CNNHead):
    """``CNNHead`` + a reduced ``layers.0`` skip merged at 128 px (before the fuse block).

    ``image`` is ``(B, 1 + fine_in, S, S)`` (or with an extra axis of 1, as ``train_head`` and
    ``predict_logits`` add it): channel 0 the slice image, the rest the features, nearest-
    upsampled to S.
    """

    def __init__(self, *args, fine_in: int = FINE_CH, fine_width: int = 32, **kw) -> None:
        super().__init__(*args, **kw)
        self.fine_in = fine_in
        self.fine = nn.Sequential(nn.Conv2d(fine_in, fine_width, 1),
                                  nn.GroupNorm(8, fine_width), nn.GELU())
        old = self.up.fuse[0]
        self.up.fuse[0] = nn.Conv2d(old.in_channels + fine_width, old.out_channels, 3, padding=1)

    def forward(self, emb: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if image.dim() == 5:
            image = image[:, 0]
        img, feats = image[:, :1], image[:, 1:]
        up = self.up
        x = up.up(self.body(emb))
        mid = up.mid_size
        if x.shape[-1] != mid:
            x = F.interpolate(x, size=(mid, mid), mode="bilinear", align_corners=False)
        im_mid = F.interpolate(img, size=(mid, mid), mode="area")
        f = F.avg_pool2d(feats, feats.shape[-1] // mid) if feats.shape[-1] != mid else feats
        x = up.fuse(torch.cat([x, up.skip(im_mid), self.fine(f)], dim=1))
        # The refinement block, as _UpPath.forward runs it.
        full = F.interpolate(img, size=(up.refine_size,) * 2, mode="area")
        if x.shape[-1] != up.refine_size:
            x = F.interpolate(x, size=(up.refine_size,) * 2, mode="bilinear", align_corners=False)
        x = x + up.full(torch.cat([x, full], dim=1))
        if x.shape[-1] != up.out_size:
            x = F.interpolate(x, size=(up.out_size,) * 2, mode="bilinear", align_corners=False)
        return x


def _build_head(kind, embed_dim=256, n_classes=3, model=None, **options):
    """``build_head`` with the prototype's ``fine_in`` option (patched into samliver.training)."""
    fine_in = options.pop("fine_in", 0)
    if not fine_in and embed_dim == model.embed_dim:
        return build_head(kind, embed_dim=embed_dim, n_classes=n_classes, model=model, **options)
    # build_head takes the channels from the model: the l2 option's wider input needs the class.
    cls, extra = (FineCNNHead, {"fine_in": fine_in}) if fine_in else (CNNHead, {})
    head = cls(embed_dim, n_classes, int(model.image_size), embed_hw=int(model.embed_hw[0]),
               **extra, **options)
    head.options, head.tta = dict(options, **extra), False
    return head


training.build_head = _build_head


# ---------------------------------------------------------------- evaluation

def probabilities(volume, embeddings, feats: Features, head, zs: list[int], opt: dict) -> np.ndarray:
    """Class probabilities of ``zs`` in the original geometry (what predict_probabilities gives)."""
    tf = embeddings.transform
    out = []
    for i in range(0, len(zs), 8):
        chunk = zs[i:i + 8]
        emb, _, images = slice_tensors(volume, embeddings, chunk, need_label=False)
        p = predict_logits(head, feats.emb(emb, chunk, opt["l2"]), feats.images(images, chunk, opt["fine"]),
                           batch_size=8)
        out.append(np.asarray(tf.mask_to_original(p.astype(np.float32)), np.float32))
    return np.concatenate(out)


def summary(paths: list[str]) -> str:
    """Markdown table (mean +- sd over seeds) of the records in ``paths``."""
    lines = ["| split | protocol | option | variant | liver Dice | tumour Dice | lesion F1 | train s | infer s | runs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(OPTIONS)}
    for (mode, protocol, option, variant), rs in sorted(read_groups(paths).items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][3], order.get(kv[0][2], 99))):
        lines.append(f"| {mode} | {protocol} | {option} | {variant} | "
                     f"{fmt([r.get('liver_dice') for r in rs])} | {fmt([r.get('tumour_dice') for r in rs])} | "
                     f"{fmt([r.get('lesion_f1') for r in rs])} | {fmt([r.get('train_seconds') for r in rs], 0)} | "
                     f"{fmt([r.get('infer_seconds') for r in rs], 0)} | {len(rs)} |")
    return "\n".join(lines)


def _library_run(volume, model, embeddings, info, name, mode, protocol, seed, train, score_on,
                 write) -> None:
    """One run of the ``fine`` recipe through the library (no patched head, no side file)."""
    from samliver.embeddings import embed_fine_features
    from samliver.inference import predict_probabilities

    fine = embed_fine_features(volume, model)  # cached beside the embeddings after the first call
    t0 = time.time()
    emb, labels, images = slice_tensors(volume, embeddings, train)
    res = train_head(emb, labels, images=images, fine=fine.stack(train),
                     config=recipe("fine", seed=seed, threads=1), model=model, progress=False,
                     model_info=info)
    base = {"option": name, "mode": mode, "protocol": protocol, "seed": seed,
            "train_seconds": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in res.head.parameters())}
    t0 = time.time()
    _, p = predict_probabilities(volume, model, res.head, embeddings=embeddings, slices=score_on,
                                 progress=False)
    write({**base, "variant": "plain", "infer_seconds": round(time.time() - t0, 1),
           **_score(volume, p, score_on, mode == "test")})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/multiscale.jsonl")
    ap.add_argument("--options", nargs="+", default=["base", "fine", "l2"])
    ap.add_argument("--modes", nargs="+", default=["val", "test"])
    ap.add_argument("--protocols", nargs="+", default=["sparse", "slab"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--val-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--features", action="store_true", help="only compute the side-file features")
    ap.add_argument("--summary", nargs="+", help="print the table of these JSONL files and stop")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    torch.set_num_threads(1)
    volume = load_sample()
    model = get_model()
    embeddings = embed_volume(volume, model, progress=False)
    if args.features or any(OPTIONS[o]["fine"] or OPTIONS[o]["l2"] for o in args.options):
        folder = compute_features(volume, model)
        if args.features:
            print(folder, (folder / "done").read_text())
            return
        feats = Features(folder, embeddings)
    else:  # the base option reads no side file
        feats = Features.__new__(Features)
    info = model_info(model, embeddings)
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["option"], r["mode"], r["protocol"], r["seed"], r["variant"]))

    def write(rec: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    probs_by: dict = {}
    for mode in args.modes:
        for seed in (args.val_seeds if mode == "val" else args.seeds):
            for protocol in args.protocols:
                train, test = protocol_split(volume.label, protocol=protocol, k=8)
                if mode == "val":
                    score_on = [train[i] for i in VAL_SLOTS]
                    train = [z for z in train if z not in score_on]
                else:
                    score_on = test
                for name in args.options:
                    if (name, mode, protocol, seed, "plain") in done:
                        continue
                    opt = OPTIONS[name]
                    if opt.get("library"):
                        _library_run(volume, model, embeddings, info, name, mode, protocol, seed,
                                     train, score_on, write)
                        continue
                    cfg = recipe("default", seed=seed, threads=1)
                    if opt["fine"]:
                        cfg.head_options = dict(cfg.head_options, fine_in=FINE_CH)
                    t0 = time.time()
                    emb, labels, images = slice_tensors(volume, embeddings, train)
                    res = train_head(feats.emb(emb, train, opt["l2"]), labels,
                                     images=feats.images(images, train, opt["fine"]), config=cfg,
                                     model=model, progress=False, model_info=info)
                    base = {"option": name, "mode": mode, "protocol": protocol, "seed": seed,
                            "train_seconds": round(time.time() - t0, 1),
                            "params": sum(p.numel() for p in res.head.parameters())}
                    t0 = time.time()
                    p = probabilities(volume, embeddings, feats, res.head, score_on, opt)
                    write({**base, "variant": "plain", "infer_seconds": round(time.time() - t0, 1),
                           **_score(volume, p, score_on, mode == "test")})
                    if mode == "test":
                        runs = probs_by.setdefault((name, protocol), [])
                        runs.append(p.astype(np.float16))
                        if len(runs) == len(args.seeds) > 1:
                            avg = np.mean([r.astype(np.float32) for r in runs], axis=0)
                            write({"option": name, "mode": mode, "protocol": protocol, "seed": -1,
                                   "variant": "ens3", **_score(volume, avg, score_on, True)})


if __name__ == "__main__":
    main()
