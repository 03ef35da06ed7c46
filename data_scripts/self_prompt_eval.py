"""Does SAM's own decoder refine a prompt-free head's liver? (docs/heads.md, "Head boxes as SAM
prompts").

For each test slice: the `default` head's liver (after post-processing) gives a tight box
(``prompts.box_from_mask``); LiteMedSAM decodes a mask from that box (the exact shared decoder);
the liver becomes SAM's mask (``sam``), its intersection with the head's (``sam_and``) or their
union (``sam_or``); the head's tumour voxels stay tumour inside the new liver. The result is
prompt-free end to end (the box comes from the head, not from a user). K = 8, the sample, the
fixed protocols; one JSON line per (protocol, seed, variant) on standard output.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python data_scripts/self_prompt_eval.py --protocols sparse slab --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from samliver.datasets import protocol_split
from samliver.embeddings import embed_volume
from samliver.evaluation import label_dice
from samliver.experiment import run_head
from samliver.models import get_model
from samliver.postprocess import postprocess
from samliver.prompt_based_segmentation import Predictor
from samliver.prompts import box_from_mask
from samliver.sample import load_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocols", nargs="+", default=["sparse", "slab"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    vol = load_sample()
    model = get_model("litemedsam", device="cpu")
    model.num_threads = 1
    emb = embed_volume(vol, model, progress=False)
    sam = Predictor(model, decoder="shared")
    h, w = vol.hu.shape[1:]
    for protocol in args.protocols:
        train, test = protocol_split(vol.label, protocol=protocol, k=8)
        for seed in args.seeds:
            pred = run_head(vol, emb, model, "default", train, test, seed=seed)["pred"]
            variants = {name: pred.copy() for name in ("head", "sam", "sam_and", "sam_or")}
            t0 = time.time()
            for i, z in enumerate(test):
                head_liver = pred[i] >= 1
                box = box_from_mask(head_liver)
                if box is None:
                    continue
                sam.set_embedding(emb[z], (h, w), model_name=model.name)
                mask = sam.predict(box=box)[0][0]
                for name, liver in (("sam", mask), ("sam_and", mask & head_liver), ("sam_or", mask | head_liver)):
                    out = variants[name][i]
                    out[:] = 0
                    out[liver] = 1
                    out[liver & (pred[i] == 2)] = 2
            seconds = time.time() - t0
            for name, v in variants.items():
                scores = label_dice(v if name == "head" else postprocess(v), vol.label[test])
                print(json.dumps({"protocol": protocol, "seed": seed, "variant": name,
                                  "liver_dice": round(scores["liver_dice"], 4),
                                  "tumour_dice": round(scores["tumour_dice"], 4),
                                  "sam_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
