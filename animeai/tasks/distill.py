"""Distillation: a small student classifier learns from a frozen teacher classifier (soft labels).

The student is the detector's classifier (same data pipeline, backbone factory, optimizer, schedule and model
file: :class:`~animeai.tasks.detector.DetectorTask` is reused, only the loss, the teacher and the file's
``distilled_from`` note are added), so ``animeai predict / evaluate / info`` and the online system load the
student unchanged.

Design decisions:

* **Teacher logits on the fly, on the same augmented batch.** Each training batch goes through the frozen
  teacher as well as the student: the soft targets then describe exactly the (rotated, flipped, jittered) image
  the student sees. Cached logits would have to be computed on un-augmented images, and a soft label of the
  plain image is the wrong target for its augmented view. The teacher's forward pass (no gradients) costs less
  than the student's forward + backward at these sizes, and needs no cache to invalidate.
* **Normalisation and size.** The loader normalises images as the *student's* backbone expects (what the student
  sees at inference too); :class:`TeacherInput` maps a batch back into the *teacher's* normalisation (an exact
  per-channel affine map) and, if the student trains at another size, resizes it to the teacher's image size.
  ``data.image_size = 0`` (the default) trains the student at the teacher's size.
* **Classes.** The data folder must hold exactly the teacher's classes in the teacher's order (the student's
  class ids are the teacher's); anything else is an error naming the missing / extra classes.
* **The teacher is not one of ``self.models``**: it is never handed to ``accelerator.prepare`` (DDP refuses a
  module without trainable parameters, and its weights need no place in the resumable state: it is re-read from
  its file). It is frozen (``requires_grad=False``) and kept in eval mode whatever ``train_mode`` is called with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from animeai.checkpoint import CheckpointError, file_sha256
from animeai.config import DistillConfig
from animeai.metrics import topk_correct
from animeai.tasks.detector import DetectorTask, make_optimizer
from animeai.weights import WeightsError


class ClassMismatchError(ValueError):
    """The data folder's classes are not the teacher's."""


# ------------------------------------------------------------------------------------------------ losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: ``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch.

    The ``T^2`` keeps the gradient scale of the soft term independent of ``T``."""
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
             alpha: float = 1.0, beta: float = 8.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): ``alpha * TCKD + beta * NCKD``, each a KL at temperature ``T`` times ``T^2``.

    TCKD compares the binary (target class vs the rest) probabilities; NCKD compares the distributions over the
    non-target classes only (the target logit masked out)."""
    T = float(temperature)
    gt = F.one_hot(labels, student_logits.shape[1]).to(student_logits.dtype)
    p_s, p_t = F.softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], dim=1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * (T * T)
    mask = gt * 1000.0
    nckd = F.kl_div(F.log_softmax(student_logits / T - mask, dim=1), F.softmax(teacher_logits / T - mask, dim=1),
                    reduction="batchmean") * (T * T)
    return alpha * tckd + beta * nckd


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                 temperature: float, alpha: float, kind: str = "kd", label_smoothing: float = 0.0,
                 dkd_alpha: float = 1.0, dkd_beta: float = 8.0) -> dict[str, torch.Tensor]:
    """``loss = alpha * soft + (1 - alpha) * CE(student, labels)``; returns ``loss``, ``soft`` and ``ce``."""
    if kind == "kd":
        soft = kd_loss(student_logits, teacher_logits, temperature)
    elif kind == "dkd":
        soft = dkd_loss(student_logits, teacher_logits, labels, temperature, dkd_alpha, dkd_beta)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; use kd or dkd")
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return {"loss": alpha * soft + (1.0 - alpha) * ce, "soft": soft, "ce": ce}


# ------------------------------------------------------------------------------------------------ teacher


class TeacherInput(nn.Module):
    """The frozen teacher behind an input adapter: a batch normalised for the student is mapped to the teacher's
    normalisation (``x * s_std / t_std + (s_mean - t_mean) / t_std``) and, if needed, resized to its image size."""

    def __init__(self, teacher: nn.Module, student_mean, student_std, teacher_mean, teacher_std, teacher_size: int):
        super().__init__()
        s_mean, s_std = torch.tensor(student_mean).view(1, 3, 1, 1), torch.tensor(student_std).view(1, 3, 1, 1)
        t_mean, t_std = torch.tensor(teacher_mean).view(1, 3, 1, 1), torch.tensor(teacher_std).view(1, 3, 1, 1)
        self.register_buffer("scale", (s_std / t_std).float(), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).float(), persistent=False)
        self.size = int(teacher_size)
        self.net = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x)

    def train(self, mode: bool = True) -> TeacherInput:  # always eval: batch-norm statistics and dropout stay fixed
        return super().train(False)


def load_teacher(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher's network (frozen, eval mode, CPU) and its classifier metadata; ``CheckpointError`` naming
    ``--teacher`` for a missing file, a file that is not a model file, or a model that is not a classifier."""
    from animeai.inference import Classifier

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--teacher {p}: teacher model file not found (train one with `animeai train detector "
                              "--out ...`, then pass its path)")
    try:
        clf = Classifier.from_file(p, device="cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"--teacher: {exc} (the teacher must be a classifier model file)") from None
    if clf.model is None:
        raise CheckpointError(f"--teacher {p}: an ONNX export cannot be a teacher; pass its .pth model file")
    net = clf.model.eval().requires_grad_(False)
    return net, clf.meta


def check_classes(data_classes: list[str], teacher_classes: list[str], data_root: str, teacher_path: str) -> None:
    """Teacher and data must agree on the classes, names and order (the student's class ids are the teacher's)."""
    if list(data_classes) == list(teacher_classes):
        return
    missing = [c for c in teacher_classes if c not in data_classes]
    extra = [c for c in data_classes if c not in teacher_classes]
    parts = []
    if missing:
        parts.append(f"classes of the teacher missing from the data: {', '.join(map(repr, missing))}")
    if extra:
        parts.append(f"classes in the data the teacher does not know: {', '.join(map(repr, extra))}")
    if not parts:
        parts.append(f"the same classes in another order (teacher: {', '.join(teacher_classes)}; data: "
                     f"{', '.join(data_classes)})")
    raise ClassMismatchError(f"--data {data_root} and --teacher {teacher_path} do not agree on the classes: "
                             + "; ".join(parts) + ". Distil on data with exactly the teacher's classes.")


# ------------------------------------------------------------------------------------------------ the task


class DistillTask(DetectorTask):
    name = "distill"
    monitor = "val_top1"
    monitor_mode = "max"

    def __init__(self, cfg: DistillConfig):
        super().__init__(cfg)
        self.teacher: TeacherInput | None = None
        self.teacher_meta: dict[str, Any] = {}
        self._size = 0

    @property
    def image_size(self) -> int:
        return self._size

    def setup(self, accelerator) -> None:
        cfg = self.cfg
        # Teacher and student weights first: a bad teacher or weights source fails before any image is decoded.
        teacher_net, tmeta = load_teacher(cfg.distill.teacher)
        self.teacher_meta = tmeta
        self.teacher_sha256 = file_sha256(cfg.distill.teacher)
        model, spec = self.build_backbone()
        self._size = cfg.data.image_size or int(tmeta["image_size"])
        self.precheck_classes(list(tmeta["class_names"]))  # from the folder names, before any image is decoded
        self.build_data(accelerator, self._size, spec.mean, spec.std)
        check_classes(self.class_names, list(tmeta["class_names"]), cfg.data.root, cfg.distill.teacher)
        model = self.finish_model(model)
        self.mean, self.std = spec.mean, spec.std
        self.teacher = TeacherInput(teacher_net, spec.mean, spec.std, tmeta["mean"], tmeta["std"],
                                    int(tmeta["image_size"])).to(accelerator.device).eval()
        if accelerator.is_main_process:
            accelerator.print(f"teacher: {cfg.distill.teacher} ({tmeta['arch']}, {tmeta['image_size']} px); student: "
                              f"{cfg.model.arch} at {self._size} px, weights {self.pretrained_source}")
        self.models = {"model": model}
        self.optimizers = {"model": make_optimizer(model, cfg.optim.lr, cfg.optim.weight_decay)}

    def precheck_classes(self, teacher_classes: list[str]) -> None:
        from animeai.data.folder import DatasetError, find_classes, has_train_val
        from animeai.data.remote import is_url

        d = self.cfg.data
        if is_url(d.root):
            return  # object storage: the classes are compared once it is listed (build_data)
        root = Path(d.root)
        if d.val_root is None and has_train_val(root):
            root = root / "train"
        try:
            names = find_classes(root)
        except (DatasetError, OSError):
            return  # build_data reports what is wrong with the folder
        check_classes(names, teacher_classes, d.root, self.cfg.distill.teacher)

    def build_backbone(self):
        try:
            return super().build_backbone()
        except WeightsError as exc:  # the detector's message names --pretrained; here the flag is --student-pretrained
            text = str(exc).replace("--pretrained", "--student-pretrained")
            raise WeightsError(f"student {text} Offline, a student with offline ImageNet weights: --student "
                               "efficientnet_lite0 --student-pretrained package.") from None

    def train_mode(self, mode: bool = True) -> None:
        super().train_mode(mode)
        if self.teacher is not None:
            self.teacher.eval()

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.teacher(images).float()

    def training_step(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        images = self.train_images(images)  # the same augmented batch for student and teacher
        d = self.cfg.distill
        student = self.models["model"](images).float()
        out = distill_loss(student, self.teacher_logits(images), labels, temperature=d.temperature, alpha=d.alpha,
                           kind=d.loss, label_smoothing=self.cfg.optim.label_smoothing, dkd_alpha=d.dkd_alpha,
                           dkd_beta=d.dkd_beta)
        return {"loss": out["loss"], "soft": out["soft"].detach(), "ce": out["ce"].detach()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model = self.models["model"]
        loss_sum, n, top1, top5, teacher_top1, agree = 0.0, 0, 0, 0, 0, 0
        for images, labels in self.val_loader:
            logits, t_logits = model(images).float(), self.teacher_logits(images)
            logits, t_logits, labels = self.accelerator.gather_for_metrics((logits, t_logits, labels))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            hits = topk_correct(logits, labels, (1, 5))
            top1 += int(hits[1].sum())
            top5 += int(hits[5].sum())
            teacher_top1 += int((t_logits.argmax(1) == labels).sum())
            agree += int((t_logits.argmax(1) == logits.argmax(1)).sum())
            n += labels.numel()
        n = max(n, 1)
        return {"val_loss": loss_sum / n, "val_top1": top1 / n, "val_top5": top5 / n,
                "val_teacher_top1": teacher_top1 / n, "val_agreement": agree / n}

    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().export()
        d = self.cfg.distill
        meta["distilled_from"] = {
            "teacher": str(d.teacher), "teacher_sha256": self.teacher_sha256, "teacher_arch": self.teacher_meta["arch"],
            "teacher_image_size": int(self.teacher_meta["image_size"]), "loss": d.loss, "temperature": d.temperature,
            "alpha": d.alpha, **({"dkd_alpha": d.dkd_alpha, "dkd_beta": d.dkd_beta} if d.loss == "dkd" else {}),
        }
        return tensors, meta


def make_smoke_teacher(smoke_data: dict[str, Any], workdir: str | Path | None = None) -> Path:
    """For ``jobs/train_model_distillation.py --smoke-test``: generate the smoke characters (``smoke_data``: the
    arguments of ``make_synthetic_dataset``, the same the workers generate) and train a tiny teacher on them on the
    driver (Lite0 offline weights, 64 px, 4 epochs). Its path is absolute; on a multi-node cluster ``workdir`` must
    be storage every node sees."""
    import tempfile

    from animeai.data.synthetic import make_synthetic_dataset
    from animeai.generation import train_smoke_classifier

    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="animeai-distill-smoke-"))
    work = work.absolute()
    make_synthetic_dataset(work / "chars", **smoke_data)
    return train_smoke_classifier(work, work / "chars", "teacher")
