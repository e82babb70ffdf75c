"""The fusion model: image encoder (registry backbone) + text encoder -> fusion -> classifier.

Late fusion of pooled features. Each side is layer-normalised (a 1280-d EfficientNet vector and a 384/768-d
mean-pooled BERT vector live on different scales), then:

* ``concat``: ``[image, text]`` -> Linear -> GELU -> Dropout -> Linear (the baseline);
* ``gated``: a gated multimodal unit (Arevalo et al. 2017): ``z * tanh(W_i image) + (1 - z) * tanh(W_t text)``
  with ``z = sigmoid(W_z [image, text])`` per hidden unit -> Dropout -> Linear.

An image without text gets a learned "no text" vector in place of its text features (``has_text`` False); given no
texts at all, the text encoder is not run. Training removes texts at random (modality dropout, the task's
``--text-dropout``), so the same model serves images with and without text. ``inputs`` = ``image`` / ``text`` makes
the same model a single-modality baseline (every text removed / the image encoder not run).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from animeai.models.text import TextEncoder

FUSION_TYPES = ("concat", "gated")
INPUTS = ("both", "image", "text")


class FusionModel(nn.Module):
    def __init__(self, image: nn.Module, text: TextEncoder, num_classes: int, fusion: str = "concat",
                 hidden: int = 256, dropout: float = 0.2, inputs: str = "both"):
        super().__init__()
        if fusion not in FUSION_TYPES:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSION_TYPES)}")
        if inputs not in INPUTS:
            raise ValueError(f"unknown inputs {inputs!r}; use one of {', '.join(INPUTS)}")
        self.fusion, self.inputs = fusion, inputs
        self.image = image  # a timm backbone whose classifier is removed: forward -> pooled features
        self.text = text
        di, dt = int(image.num_features), int(text.dim)
        self.image_norm = nn.LayerNorm(di)
        self.text_norm = nn.LayerNorm(dt)
        self.missing_text = nn.Parameter(torch.zeros(dt))
        if fusion == "concat":
            self.mix = nn.Sequential(nn.Linear(di + dt, hidden), nn.GELU())
        else:
            self.proj_image = nn.Linear(di, hidden)
            self.proj_text = nn.Linear(dt, hidden)
            self.gate = nn.Linear(di + dt, hidden)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.inputs == "text":  # the text-only baseline: the image encoder is not run
            return self.image_norm(images.new_zeros((images.shape[0], self.image_norm.normalized_shape[0])))
        return self.image_norm(self.image(images))

    def text_features(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      has_text: torch.Tensor | None, n: int) -> torch.Tensor:
        """Normalised text features, the learned "no text" vector where ``has_text`` is False (or no text at all).

        With ``input_ids`` the text path always runs, even if no row has text (under DDP every trained parameter
        must take part in each step); without them (inference on images only) it is skipped."""
        missing = self.missing_text.unsqueeze(0).expand(n, -1)
        if input_ids is None or has_text is None:
            return missing
        if self.inputs == "image":  # the image-only baseline: every text removed
            has_text = torch.zeros_like(has_text)
        feats = self.text_norm(self.text(input_ids, attention_mask).to(missing.dtype))
        return torch.where(has_text.unsqueeze(1), feats, missing)

    def head(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if self.fusion == "concat":
            h = self.mix(torch.cat([img, txt], dim=1))
        else:
            z = torch.sigmoid(self.gate(torch.cat([img, txt], dim=1)))
            h = z * torch.tanh(self.proj_image(img)) + (1 - z) * torch.tanh(self.proj_text(txt))
        return self.classifier(self.drop(h))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, has_text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(n, num_classes)``; without ``input_ids`` image only."""
        img = self.image_features(images)
        return self.head(img, self.text_features(input_ids, attention_mask, has_text, img.shape[0]))
