"""Where few-shot accuracy on unseen characters is lost (issue 13): the 15-class holo20 detector of
``bench_online_holo20.py`` embeds holo20 train and val once; then nearest-prototype top-1 over all 20 roles (old
roles: every train image; new roles: ``--shots`` random train images, ``--draws`` draws) for several embeddings:

* the penultimate features (what the classifier head reads, and what ``OnlineLearningSystem`` indexes with
  ``embedding="penultimate"``), with and without a horizontally flipped copy of each exemplar, and centred on the
  old roles' mean before normalising (SimpleShot's CL2N);
* the final feature map GeM-pooled (p = 3), then also square-rooted, and the system's default ``multiscale``
  descriptor (:mod:`animeai.online.embedding`: final map and last two stages, mirror-averaged);
* the mean-pooled outputs of the backbone's last stages, concatenated (each L2-normalised);
* the same backbone with its ImageNet weights and no fine-tuning (``--imagenet``);
* more shots (10, 20) of the penultimate features.

    python tests/benchmarks/bench_fewshot_features.py [--detector runs/bench_online_holo20/detector_without_...pth]

Without the data folder or the detector it prints a message and exits 0 (train the detector with
``bench_online_holo20.py`` first).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from _common import add_common_args, apply_threads, machine_info, print_table, unseen_characters, write_json

NAME = "bench_fewshot_features"
REPO = Path(__file__).resolve().parents[2]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, NAME)
    p.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "datasets" / "holo20")
    p.add_argument("--detector", type=Path, default=None, help="the 15-class detector (default: the one "
                   "bench_online_holo20.py leaves under runs/bench_online_holo20/)")
    p.add_argument("--new", default=None, help="the unseen characters (default: every 4th name from the 3rd, as "
                   "bench_online_holo20.py)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--stages", type=int, nargs="+", default=[3, 4, 5, 6], help="backbone stages to pool and concat")
    p.add_argument("--imagenet", action="store_true", help="also the un-fine-tuned ImageNet backbone")
    return p.parse_args(argv)


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embed_all(model_path, paths, stages, flip=False):
    """Penultimate features and pooled stage outputs of every image (eval transform, optionally flipped)."""
    import torch
    from PIL import ImageOps

    from animeai.data.images import load_image
    from animeai.inference import Classifier
    from animeai.online.embedding import Embedder, gem

    clf = Classifier.from_file(model_path, device="cpu")
    multiscale = Embedder(clf, "multiscale")
    caps: dict[int, torch.Tensor] = {}
    hooks = [clf.model.blocks[i].register_forward_hook(
        lambda m, inp, out, i=i: caps.__setitem__(i, out.float().mean((2, 3)))) for i in stages]
    pen, st, gems, descs = [], {i: [] for i in stages}, [], []
    for s in range(0, len(paths), 64):
        ims = [load_image(p, draft_size=clf.image_size) for p in paths[s: s + 64]]
        if flip:
            ims = [ImageOps.mirror(im) for im in ims]
        batch = torch.stack([clf.transform(im) for im in ims])
        with torch.no_grad():  # one pass: the penultimate features (= clf.embed) and the final map
            head, maps = multiscale._maps(batch)
        pen.append(head.float().numpy())
        gems.append(gem(maps[0]).numpy())
        for i in stages:  # the hooks' outputs of that pass (the mirrored pass below runs the blocks again)
            st[i].append(caps[i].numpy())
        descs.append(multiscale.split(multiscale(batch))[1])
    for h in hooks:
        h.remove()
    st = {i: np.concatenate(v) for i, v in st.items()}
    st["gem"], st["multiscale"] = np.concatenate(gems), np.concatenate(descs)
    return np.concatenate(pen), st


def prototype_top1(xtr, ytr, xv, yv, new_ids, old_ids, shots, draws, extra=None):
    """Mean top-1 (new roles, old roles) over ``draws`` draws of the new roles' shots; ``extra`` maps a train
    index to more views of that exemplar (e.g. its flipped copy)."""
    out = []
    for seed in range(draws):
        rng = random.Random(seed)
        protos = []
        for c in range(int(ytr.max()) + 1):
            idx = list(np.where(ytr == c)[0])
            if c in new_ids:
                idx = rng.sample(idx, shots)
                views = [l2(xtr[idx])] + ([l2(extra[idx])] if extra is not None else [])
                protos.append(np.concatenate(views).mean(0))
            else:
                protos.append(l2(xtr[idx]).mean(0))
        pred = (l2(xv) @ l2(np.stack(protos)).T).argmax(1)
        out.append((np.mean([np.mean(pred[yv == c] == c) for c in new_ids]),
                    np.mean([np.mean(pred[yv == c] == c) for c in old_ids])))
    a = np.array(out)
    return float(a[:, 0].mean()), float(a[:, 0].std()), float(a[:, 1].mean())


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data.resolve()
    if not ((data / "train").is_dir() and (data / "val").is_dir()):
        print(f"{NAME}: skipped - data not found at {data}")
        return 0
    names = sorted(d.name for d in (data / "train").iterdir() if d.is_dir())
    new = unseen_characters(names, args.new)
    detector = args.detector or REPO / "runs" / "bench_online_holo20" / f"detector_without_{'_'.join(new)}.pth"
    if not detector.is_file():
        print(f"{NAME}: skipped - no detector at {detector}; run bench_online_holo20.py first")
        return 0
    apply_threads(args.threads)
    new_ids = [names.index(n) for n in new]
    old_ids = [i for i in range(len(names)) if i not in new_ids]

    def listing(split):
        paths, labels = [], []
        for i, n in enumerate(names):
            ps = sorted(p for p in (data / split / n).iterdir() if p.suffix.lower() in IMAGE_EXTS)
            paths += ps
            labels += [i] * len(ps)
        return paths, np.array(labels)

    (ptr, ytr), (pv, yv) = listing("train"), listing("val")
    print(f"{NAME}: embedding {len(ptr)} train + {len(pv)} val images ...", flush=True)
    xtr, str_ = embed_all(detector, ptr, args.stages)
    xv, sv = embed_all(detector, pv, args.stages)
    xflip, _ = embed_all(detector, ptr, [], flip=True)
    mu = xtr[np.isin(ytr, old_ids)].mean(0)
    cat_tr = np.concatenate([l2(str_[i]) for i in args.stages], 1)
    cat_v = np.concatenate([l2(sv[i]) for i in args.stages], 1)
    k = (args.shots, args.draws)
    rows = {
        "penultimate (the head's input; embedding=penultimate)": prototype_top1(xtr, ytr, xv, yv, new_ids, old_ids, *k),
        "+ flipped copy of each exemplar": prototype_top1(xtr, ytr, xv, yv, new_ids, old_ids, *k, extra=xflip),
        "centred on the old roles' mean (CL2N)": prototype_top1(xtr - mu, ytr, xv - mu, yv, new_ids, old_ids, *k),
        f"stages {args.stages} pooled, concatenated": prototype_top1(cat_tr, ytr, cat_v, yv, new_ids, old_ids, *k),
        "final map GeM-pooled (p = 3)": prototype_top1(str_["gem"], ytr, sv["gem"], yv, new_ids, old_ids, *k),
        "... and square-rooted": prototype_top1(np.sqrt(str_["gem"]), ytr, np.sqrt(sv["gem"]), yv, new_ids, old_ids,
                                                *k),
        "multiscale descriptor (the system's default)": prototype_top1(str_["multiscale"], ytr, sv["multiscale"], yv,
                                                                      new_ids, old_ids, *k),
        f"multiscale, {2 * args.shots} shots": prototype_top1(str_["multiscale"], ytr, sv["multiscale"], yv, new_ids,
                                                              old_ids, 2 * args.shots, args.draws),
        f"penultimate, {2 * args.shots} shots": prototype_top1(xtr, ytr, xv, yv, new_ids, old_ids, 2 * args.shots,
                                                               args.draws),
        f"penultimate, {4 * args.shots} shots": prototype_top1(xtr, ytr, xv, yv, new_ids, old_ids, 4 * args.shots,
                                                               args.draws),
    }
    if args.imagenet:
        from animeai.checkpoint import read_metadata, save_model_file
        from animeai.models import create_model

        meta = read_metadata(detector)
        net = create_model(meta["arch"], num_classes=len(meta["class_names"]), pretrained="package")
        plain = REPO / "runs" / NAME / "imagenet_backbone.pth"
        plain.parent.mkdir(parents=True, exist_ok=True)
        save_model_file(plain, net.state_dict(), meta)
        itr, _ = embed_all(plain, ptr, [])
        iv, _ = embed_all(plain, pv, [])
        rows["ImageNet backbone, no fine-tuning"] = prototype_top1(itr, ytr, iv, yv, new_ids, old_ids, *k)
    print_table(["embedding", "new roles top-1", "spread", "old roles top-1"],
                [[name, f"{a:.3f}", f"{s:.3f}", f"{o:.3f}"] for name, (a, s, o) in rows.items()],
                title=f"{NAME}: nearest prototype over {len(names)} roles, {len(new)} unseen ({', '.join(new)}), "
                      f"{args.shots} shots, {args.draws} draws (goal of issue 13: new roles >= 0.80)")
    write_json(args.out, NAME, {k: str(v) for k, v in vars(args).items()},
               {name: {"new_top1": a, "new_spread": s, "old_top1": o} for name, (a, s, o) in rows.items()},
               machine_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
