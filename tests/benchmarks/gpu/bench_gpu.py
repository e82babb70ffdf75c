"""The prepared GPU benchmark: one script, a few minutes on a lent GPU machine (runs on the CPU with --quick).

What it measures, each through the project's own code:

* ``model``     detector training step alone (EfficientNet-B0, 224 px, AdamW, bf16 autocast, channels-last) on
                tensors already on the device: images/s, eager and ``torch.compile``.
* ``decode``    the DataLoader's decode capacity: JPEG files -> the detector's training transform at 224 px with
                one worker per core, no model: images/s (can the CPUs feed the GPU?), for both places the
                augmentation can run (``--augment-on workers``: all of it in the loader; ``device``: the loader
                decodes, crops and flips to uint8, and jitter/rotation/normalisation run batched on the GPU,
                timed alone as ``augment``).
* ``engine``    ``engine.train`` of the detector task end to end on those JPEG files (bf16, channels-last, the
                loader workers of ``decode``), with the augmentation in the workers and on the device: images/s of
                the last epoch and the GPU utilisation sampled meanwhile (the data path is the bottleneck if
                utilisation is low while ``decode`` is close to ``engine``).
* ``generator`` the generator task's training step (``engine.train``, 224 px, bf16): images/s, and the total
                images/s of 1, 2 and 4 generators sharing the GPU (one process each).
* ``online``    the online system on the device (needs faiss-cpu): embedding images/s of the two database
                embeddings (``penultimate``; ``multiscale``: last stages GeM-pooled, mirror-averaged, so twice the
                batch) on device tensors, ``identify`` end to end on JPEG files (decode included), and how far the
                device's descriptors are from the CPU's for the same images.

Anchor (issue 17): timm's published EfficientNet-B0 training throughput on one A100 with AMP is about 2,500
images/s; the goal is at least that on one H100. Weights are random (``pretrained=none`` or random weight files):
speed does not depend on them, and the GPU machine has no network.

    python tests/benchmarks/gpu/bench_gpu.py                  # on the GPU machine (about 4 minutes)
    python tests/benchmarks/gpu/bench_gpu.py --quick          # CPU smoke run (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # _common
sys.path.insert(0, str(HERE.parents[2]))  # the repo: animeai without installing it

import _common  # noqa: E402
import torch  # noqa: E402

ANCHOR_A100_B0_IMAGES_PER_S = 2500.0
PARTS = ("model", "decode", "engine", "generator", "online")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(batch: int, steps: int, compile_: bool, image_size: int) -> dict:
    """Images/s of the bare detector training step (forward, loss, backward, AdamW) on device tensors."""
    import torch.nn.functional as F

    from animeai.models import create_model
    from animeai.tasks.detector import make_optimizer

    dev = _device()
    model = create_model("efficientnet_b0", 1000, pretrained="none").to(dev, memory_format=torch.channels_last)
    opt = make_optimizer(model, 1e-3, 0.05)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, image_size, image_size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            loss = F.cross_entropy(step_model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    dt = time.perf_counter() - t0
    return {"images_per_s": batch * steps / dt, "batch": batch, "steps": steps, "compile": compile_,
            "warmup_s": warm, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None}


def _make_chunk(job: tuple[Path, int, int, int]) -> None:
    """JPEGs ``start .. start + n - 1`` of one class folder (seeded by the class and ``start``)."""
    import numpy as np
    from PIL import Image

    d, start, n, size = job
    rng = np.random.default_rng([int(d.name.split("_")[-1]), start])
    d.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)


def make_jpegs(root: Path, classes: int, per_class: int, size: int, workers: int = 1) -> Path:
    """Noise-textured JPEGs (realistic decode cost for their size) in ``root/<class>/``, made in ``workers``
    processes, 100 at a time (6,000 in one process took most of a 3-minute GPU lease)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / f"class_{c:02d}", start, min(100, per_class - start), size)
            for c in range(classes) for start in range(0, per_class, 100)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_make_chunk, jobs))
    print(f"[bench_gpu] made {classes * per_class} JPEGs in {time.perf_counter() - t0:.1f} s", flush=True)
    return root


def bench_decode(root: Path, workers: int, batch: int, image_size: int, augment_on: str = "workers") -> dict:
    from torch.utils.data import DataLoader

    from animeai.data.device_augment import loader_transform
    from animeai.data.folder import ImageFolderDataset, scan_folder
    from animeai.data.transforms import train_transform
    from animeai.models.registry import IMAGENET_MEAN, IMAGENET_STD

    samples = scan_folder(root).samples
    transform = (loader_transform(image_size) if augment_on == "device"
                 else train_transform(image_size, IMAGENET_MEAN, IMAGENET_STD))
    ds = ImageFolderDataset(samples, transform, draft_size=image_size)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # workers started
    t0, n = time.perf_counter(), 0
    for images, _ in it:
        n += images.shape[0]
    dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "workers": workers, "images": n, "augment_on": augment_on}


def bench_device_augment(batch: int, image_size: int, steps: int) -> dict:
    """Images/s of the batched jitter + normalisation + rotation alone on the device (uint8 batch already there)."""
    from animeai.data.device_augment import DeviceAugment
    from animeai.models.registry import IMAGENET_MEAN, IMAGENET_STD

    dev = _device()
    aug = DeviceAugment(IMAGENET_MEAN, IMAGENET_STD, seed=0).to(dev)
    x = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, device=dev)
    for _ in range(3):
        aug(x, augment=True)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        aug(x, augment=True)
    _sync()
    return {"images_per_s": batch * steps / (time.perf_counter() - t0), "batch": batch, "steps": steps}


class GpuSampler:
    """GPU utilisation every 0.5 s in a thread: NVML through ``torch.cuda.utilization`` where it answers, else
    ``nvidia-smi`` (no samples without either). A slow or failed reading is skipped, not the end of sampling."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []  # (time.perf_counter(), utilisation %)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _read() -> float | None:
        try:
            return float(torch.cuda.utilization())
        except Exception:  # noqa: BLE001 - no NVML bindings: ask nvidia-smi
            pass
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5)
            return float(out.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self):
        if not torch.cuda.is_available():
            return
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self._stop.wait(0.5)

    def mean(self, since: float = float("-inf"), until: float = float("inf")) -> float | None:
        """Mean utilisation of the samples taken between ``since`` and ``until`` (None without samples)."""
        vals = [u for t, u in self.samples if since <= t <= until]
        return sum(vals) / len(vals) if vals else None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=6)


def bench_engine(root: Path, tmp: Path, workers: int, batch: int, image_size: int, epochs: int,
                 augment_on: str = "workers") -> dict:
    from animeai.config import DetectorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.detector import DetectorTask

    cfg = load_config(DetectorConfig, None, {
        "data.root": str(root), "data.image_size": image_size, "data.num_workers": workers, "data.val_fraction": 0.05,
        "model.arch": "efficientnet_b0", "model.pretrained": "none", "optim.batch_size": batch,
        "run.epochs": epochs, "run.progress": False, "run.out": str(tmp / "engine.pth"),
        "run.run_dir": str(tmp / "engine_run"), "run.overwrite": True, "augment.on": augment_on,
    })
    ends: list[float] = []  # when each epoch's metrics were ready (the callback runs after the state is saved)
    with GpuSampler() as gpu:
        result = train(cfg, DetectorTask(cfg), callbacks=[lambda metrics, state_dir, task: ends.append(
            time.perf_counter())])
    last = result.history[-1]
    # Utilisation during the last epoch's training only: not the data scan before epoch 1, not evaluation.
    train_s = last["epoch_s"] - last.get("eval_s", 0.0)
    since = ends[-1] - last["epoch_s"]
    return {"images_per_s": last["images_per_s"], "epoch_s": last["epoch_s"],
            "gpu_util_pct": gpu.mean(since, since + train_s), "gpu_util_pct_whole_run": gpu.mean(),
            "mixed_precision": cfg.run.mixed_precision, "workers": workers, "batch": batch, "augment_on": augment_on}


def _random_weight_files(tmp: Path) -> tuple[Path, Path, Path]:
    """A random classifier model file (the guiding detector) and random VGG16 / Lite0 weight files."""
    import torchvision
    from safetensors.torch import save_file

    from animeai.checkpoint import save_model_file
    from animeai.models import create_model
    from animeai.models.registry import IMAGENET_MEAN, IMAGENET_STD

    det = tmp / "detector.pth"
    model = create_model("efficientnet_lite0", 4, pretrained="none")
    save_model_file(det, model.state_dict(), {
        "kind": "classifier", "arch": "efficientnet_lite0", "num_classes": 4,
        "class_names": [f"class_{i:02d}" for i in range(4)], "image_size": 224,
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    vgg = tmp / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.vgg16().state_dict().items()}, str(vgg))
    lite = tmp / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("efficientnet_lite0", 1000).state_dict().items()}, str(lite))
    return det, vgg, lite


def bench_generator(root: Path, tmp: Path, image_size: int, batch: int, epochs: int, tag: str = "g") -> dict:
    from animeai.config import GeneratorConfig, load_config
    from animeai.engine import train
    from animeai.tasks.generator import GeneratorTask

    det, vgg, lite = tmp / "detector.pth", tmp / "vgg16.safetensors", tmp / "lite0.safetensors"
    cfg = load_config(GeneratorConfig, None, {
        "data.root": str(root), "data.image_size": image_size, "guide.detection_model": str(det),
        "guide.target_class": "0", "guide.perceptual": "vgg16", "guide.perceptual_pretrained": str(vgg),
        "model.d_pretrained": str(lite), "optim.batch_size": batch, "run.epochs": epochs, "run.progress": False,
        "run.out": str(tmp / f"{tag}.pth"), "run.run_dir": str(tmp / f"{tag}_run"), "run.overwrite": True,
        "run.eval_every": epochs, "sample.every": 10_000, "sample.folder": str(tmp / f"{tag}_samples"),
    })
    result = train(cfg, GeneratorTask(cfg))
    last = result.history[-1]
    return {"images_per_s": last["images_per_s"], "epoch_s": last["epoch_s"], "batch": batch}


def bench_generators_sharing(args, root: Path, tmp: Path, k: int, cores: int) -> dict:
    """``k`` generator processes at once on the one device: total images/s. Each gets ``cores // k`` CPU threads, as
    ``jobs/train_generators.py`` gives each generator the threads of its CPU share: measured on the H100, two
    processes with torch's default of one thread per core each (16 + 16 on 16 cores) made 59 images/s together,
    a quarter of what one made alone."""
    procs = []
    threads = max(1, cores // k)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for i in range(k):
        out = tmp / f"share_{k}_{i}.json"
        cmd = [sys.executable, __file__, "--only", "generator", "--work", str(tmp), "--tag", f"s{k}_{i}",
               "--gen-batch", str(args.gen_batch), "--gen-epochs", str(args.gen_epochs),
               "--gen-size", str(args.gen_size), "--gen-images", str(args.gen_images), "--threads", str(threads),
               "--result", str(out)] + (["--quick"] if args.quick else [])
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env),
                      out))
    rates = []
    for p, out in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"generator process failed: {err[-2000:]}")
        rates.append(json.loads(out.read_text())["images_per_s"])
    return {"generators": k, "threads_each": threads, "total_images_per_s": sum(rates), "per_generator": rates}


def bench_online(root: Path, tmp: Path, batch: int, steps: int, image_size: int) -> dict:
    """Embedding images/s per database embedding on device tensors, identify on files, device-vs-CPU agreement."""
    import shutil

    import numpy as np

    from animeai.checkpoint import read_metadata, save_model_file
    from animeai.inference import Classifier
    from animeai.online import OnlineLearningSystem

    dev = _device()
    model = tmp / f"online_{image_size}.pth"
    if not model.exists():
        src = Classifier.from_file(tmp / "detector.pth", device="cpu")
        meta = read_metadata(tmp / "detector.pth") | {"image_size": image_size}
        save_model_file(model, src.model.state_dict(), meta)
    enrol = tmp / "online_enrol"
    if not enrol.exists():  # 20 images of each class for the database
        for c in sorted(p.name for p in root.iterdir()):
            (enrol / c).mkdir(parents=True)
            for f in sorted((root / c).iterdir())[:20]:
                os.link(f, enrol / c / f.name)
    files = sorted((root / "class_01").iterdir())[: max(64, 4 * batch)]
    out: dict = {}
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    for kind in ("penultimate", "multiscale"):
        db = tmp / f"online_db_{kind}"
        shutil.rmtree(db, ignore_errors=True)
        ol = OnlineLearningSystem(model, db, data_root=enrol, device=str(dev), embedding=kind)
        for _ in range(3):
            ol.embedder(x)
        _sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            ol.embedder(x)
        _sync()
        emb_rate = batch * steps / (time.perf_counter() - t0)
        ol.identify(files[:8])
        t0 = time.perf_counter()
        answers = ol.identify(files)
        ident_rate = len(files) / (time.perf_counter() - t0)
        cpu = OnlineLearningSystem(model, db, device="cpu")
        a, b = ol.embed(files[:16]), cpu.embed(files[:16])
        diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        cpu_answers = cpu.identify(files[:16])
        same_top1 = float(np.mean([x[0]["role"] == y[0]["role"] for x, y in zip(answers[:16], cpu_answers)]))
        out[kind] = {"embed_images_per_s": emb_rate, "identify_images_per_s": ident_rate, "dim": ol.dim,
                     "max_rel_diff_vs_cpu": diff, "same_top1_as_cpu": same_top1, "batch": batch}
        print(f"[bench_gpu] online {kind}: embed {emb_rate:.0f} images/s, identify {ident_rate:.0f} images/s, "
              f"device vs CPU max rel diff {diff:.2e}, same top-1 {same_top1:.2f}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_common_args(p, "bench_gpu")
    p.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--batch", type=int, default=256, help="detector batch (default: 256)")
    p.add_argument("--gen-batch", type=int, default=32, help="generator batch (default: 32)")
    p.add_argument("--gen-size", type=int, default=224, help="generator image size (default: 224)")
    p.add_argument("--gen-epochs", type=int, default=2, help="generator epochs, the last one measured (default: 2)")
    p.add_argument("--gen-images", type=int, default=384,
                   help="real images of the generator's character (default: 384; 0 = all of class_00)")
    p.add_argument("--per-class", type=int, default=4000,
                   help="JPEGs per class of the 4 classes (default: 4000; an epoch's first batch waits for one worker "
                        "to decode a whole batch, so short epochs understate the steady rate)")
    p.add_argument("--augment-on", nargs="+", choices=("workers", "device"), default=["workers", "device"],
                   help="where the augmentation runs in the decode and engine parts (default: both)")
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="g", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    _common.apply_threads(args.threads)
    if args.quick:
        args.batch, args.gen_batch, args.gen_size, args.gen_epochs = 4, 4, 32, 2
    size = 64 if args.quick else 224
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = 0 if args.quick else max(1, cores - 1)
    tmp = args.work or Path(tempfile.mkdtemp(prefix="animeai-gpu-bench-"))
    data = tmp / "jpegs"
    if not data.exists():
        classes, per_class = (4, 12) if args.quick else (4, args.per_class)  # 320 px JPEGs
        make_jpegs(data, classes, per_class, 96 if args.quick else 320, workers=cores)
    gen_data = data  # the generator's real images: class_00 (all of it with --gen-images 0)
    if args.gen_images:  # a smaller character folder (hard links), for a short generator part
        gen_data = tmp / f"gen_{args.gen_images}"
        if not gen_data.exists():
            (gen_data / "class_00").mkdir(parents=True)
            for f in sorted((data / "class_00").iterdir())[: args.gen_images]:
                os.link(f, gen_data / "class_00" / f.name)
    if not (tmp / "detector.pth").exists():
        _random_weight_files(tmp)

    if args.only == ["generator"] and args.result:  # a child of bench_generators_sharing
        r = bench_generator(gen_data, tmp, args.gen_size, args.gen_batch, args.gen_epochs, args.tag)
        args.result.write_text(json.dumps(r))
        return 0

    results: dict = {}
    rows = []

    def add_row(row: list) -> None:  # each row printed and the JSON written as soon as a part ends
        rows.append(row)
        ratio = f"  ({row[2]:.2f}x)" if row[2] is not None else ""
        print(f"[bench_gpu] {row[0]}: {row[1]:.1f} images/s{ratio}", flush=True)
        _common.write_json(args.out, "bench_gpu", vars(args) | {"workers": workers, "image_size": size}, results,
                           _common.machine_info(_device()))
    steps = 3 if args.quick else 30
    if args.only is None or "model" in args.only:
        for comp in ([False] if args.no_compile or args.quick else [False, True]):
            r = bench_model(args.batch, steps, comp, size)
            results[f"model_{'compiled' if comp else 'eager'}"] = r
            add_row([f"B0 train step {'compiled' if comp else 'eager'} (batch {args.batch})", r["images_per_s"],
                         r["images_per_s"] / ANCHOR_A100_B0_IMAGES_PER_S])
    if args.only is None or "decode" in args.only:
        for where in args.augment_on:
            r = bench_decode(data, workers, args.batch, size, where)
            results[f"decode_augment_on_{where}"] = r
            what = "train transform" if where == "workers" else "crop/flip to uint8 (augment on device)"
            add_row([f"decode + {what}, {workers} workers", r["images_per_s"], None])
        if "device" in args.augment_on:
            r = bench_device_augment(args.batch, size, steps)
            results["device_augment"] = r
            add_row([f"device augment alone (jitter, rotation, normalise; batch {args.batch})", r["images_per_s"],
                     None])
    if args.only is None or "engine" in args.only:
        for where in args.augment_on:
            r = bench_engine(data, tmp, workers, args.batch, size, epochs=2 if args.quick else 3, augment_on=where)
            results[f"engine_augment_on_{where}"] = r
            util = f"{r['gpu_util_pct']:.0f} %" if r["gpu_util_pct"] is not None else "n/a"
            add_row([f"engine.train B0 end to end, augment on {where} (GPU util {util})", r["images_per_s"],
                     r["images_per_s"] / ANCHOR_A100_B0_IMAGES_PER_S])
    if args.only is None or "generator" in args.only:
        r = bench_generator(gen_data, tmp, args.gen_size, args.gen_batch, args.gen_epochs)
        results["generator"] = r
        add_row([f"generator step {args.gen_size} px (batch {args.gen_batch})", r["images_per_s"], None])
        counts = (1, 2) if args.quick else (1, 2, 4)
        sharing = [bench_generators_sharing(args, gen_data, tmp, k, cores) for k in counts]
        results["generators_sharing"] = sharing
        for s in sharing:
            add_row([f"{s['generators']} generators sharing the device, total", s["total_images_per_s"],
                         s["total_images_per_s"] / sharing[0]["total_images_per_s"]])
    if args.only is None or "online" in args.only:
        r = bench_online(data, tmp, 8 if args.quick else args.batch, steps, size if args.quick else 160)
        results["online"] = r
        add_row([f"online embedding penultimate (batch {r['penultimate']['batch']})",
                 r["penultimate"]["embed_images_per_s"], None])
        add_row(["online embedding multiscale (x penultimate)", r["multiscale"]["embed_images_per_s"],
                 r["multiscale"]["embed_images_per_s"] / r["penultimate"]["embed_images_per_s"]])
        for kind in ("penultimate", "multiscale"):
            add_row([f"online identify on JPEG files, {kind}", r[kind]["identify_images_per_s"], None])
    _common.print_table(["what", "images/s", "x anchor / x one"], rows,
                        title=f"GPU benchmark on {_device()} (anchor: timm B0 on A100 with AMP, "
                              f"{ANCHOR_A100_B0_IMAGES_PER_S:.0f} images/s)")
    _common.write_json(args.out, "bench_gpu", vars(args) | {"workers": workers, "image_size": size}, results,
                       _common.machine_info(_device()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
