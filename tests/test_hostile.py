"""Hostile files: damaged, truncated, foreign or inconsistent stores give StoreError, never a crash or a hang."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback, StoreError, StoreReader


@pytest.fixture(scope="module")
def valid_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    cb = DualFormCallback(d / "v.h5", record_queries=("test",))

    class M(MLP):
        def test_step(self, batch, batch_idx):
            return self(batch[0])

    model = M()
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=32), batch_size=8))
    trainer.test(model, torch.utils.data.DataLoader(IndexedDataset(n=8), batch_size=4))
    return str(d / "v.h5")


def test_fuzzed_stores_open_or_raise_store_error(valid_store, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "fuzz_open.py")
    proc = subprocess.run([sys.executable, script, valid_store, str(tmp_path), "1234", "100"],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "LIGHTNING_DUALFORM_PROBE_TIMEOUT": "5"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "StoreError" in proc.stdout


def test_not_a_store(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        StoreReader(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a lightning-dualform store"):
        StoreReader(foreign)
    with pytest.raises(StoreError, match="no such file"):
        StoreReader(tmp_path / "missing.h5")
    with pytest.raises(StoreError, match="directory"):
        StoreReader(tmp_path)


def test_newer_format_version(valid_store, tmp_path):
    path = tmp_path / "new.h5"
    path.write_bytes(open(valid_store, "rb").read())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="version 99 is newer.*upgrade"):
        StoreReader(path)


@pytest.mark.parametrize("column", ["values", "index", "label"])
def test_inconsistent_row_counts(valid_store, tmp_path, column):
    path = tmp_path / "short.h5"
    path.write_bytes(open(valid_store, "rb").read())
    with h5py.File(path, "r+") as f:
        f["layers"]["net.0"][column].resize((5,) + f["layers"]["net.0"][column].shape[1:])
    with pytest.raises(StoreError, match=f"net.0.*{column}"):
        StoreReader(path)


def test_nothing_is_unpickled(valid_store):
    # a store holds only numbers, strings and JSON: no object dtype anywhere
    with h5py.File(valid_store, "r") as f:
        def check(name, obj):
            if isinstance(obj, h5py.Dataset):
                assert obj.dtype.kind in "fiub", name
        f.visititems(check)
