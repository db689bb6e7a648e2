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
    proc = subprocess.run([sys.executable, script, valid_store, str(tmp_path), "1234", "50"],
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


# ------------------------------------------------------------------------------------------------------
# stores of an element-wise rule (Adam, AdamW, ...): the optimizer state and the rule's tables
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adamw_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("adamw")
    cb = DualFormCallback(d / "a.h5")
    model = MLP(opt_factory=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(model, torch.utils.data.DataLoader(IndexedDataset(n=32), batch_size=8))
    return str(d / "a.h5")


def _attend_all(path: str) -> None:
    from lightning_dualform import DualInference

    with DualInference(path, device="cpu") as di:
        for name in di.layers:
            di.attend(name, torch.zeros(2, di.layer(name).d_in), top_k=1, reuse_certificate=False)


def _set(ds_path: str, make):
    def edit(f):
        data = make(f[ds_path][()])
        del f[ds_path]
        f.create_dataset(ds_path, data=data)
    return edit


HOSTILE_ADAMW = {
    "state-shape": (_set("layers/net.0/state/weight/exp_avg_sq", lambda v: v[:, :3]), "exp_avg_sq.*shape"),
    "state-nan": (_set("layers/net.2/state/bias/exp_avg", lambda v: np.full_like(v, np.nan)), "not finite"),
    "state-missing": (lambda f: f["layers/net.0/state/weight"].__delitem__("exp_avg_sq"), "lacks.*exp_avg_sq"),
    "state-group-missing": (lambda f: f["layers/net.0"].__delitem__("state"), "keeps no optimizer state"),
    "state-step-inf": (lambda f: f["layers/net.0/state/weight"].attrs.__setitem__("step", np.inf), "step"),
    "state-step-text": (lambda f: f["layers/net.0/state/weight"].attrs.__setitem__("step", "three"), "step"),
    "table-nan": (_set("layers/net.0/updates/weight/lr", lambda v: np.where(np.arange(len(v)) == 1, np.nan, v)), "lr.*NaN"),
    "table-missing-column": (lambda f: f["layers/net.2/updates/bias"].__delitem__("beta2"), "beta2.*missing"),
    "table-missing-steps": (_set("layers/net.0/updates/weight/eps", lambda v: v[:2]), "eps.*fewer than"),
    "table-wrong-kind": (_set("layers/net.0/updates/weight/amsgrad", lambda v: v.astype(np.float64)), "amsgrad.*expected bool"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ADAMW))
def test_hostile_adamw_store_raises_store_error(adamw_store, tmp_path, case):
    edit, match = HOSTILE_ADAMW[case]
    path = tmp_path / "h.h5"
    path.write_bytes(open(adamw_store, "rb").read())
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(StoreError, match=match):
        _attend_all(str(path))


@pytest.mark.parametrize("attr, value, match", [
    ("update_rule", "lion", "unknown update rule 'lion'"),
    ("update_rule", 3, "update_rule"),
])
def test_hostile_root_attributes_of_adamw_store(adamw_store, tmp_path, attr, value, match):
    path = tmp_path / "r.h5"
    path.write_bytes(open(adamw_store, "rb").read())
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(StoreError, match=match):
        StoreReader(path)


def test_weight_shape_must_hold_the_layer(adamw_store, tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(open(adamw_store, "rb").read())
    with h5py.File(path, "r+") as f:
        f["layers/net.0"].attrs["weight_shape"] = np.array([3, 3])
    with pytest.raises(StoreError, match="weight_shape|does not hold"):
        StoreReader(path)


def test_fuzzed_adamw_stores_open_or_raise_store_error(adamw_store, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "scripts", "fuzz_open.py")
    proc = subprocess.run([sys.executable, script, adamw_store, str(tmp_path), "99", "25"],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "LIGHTNING_DUALFORM_PROBE_TIMEOUT": "5"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "StoreError" in proc.stdout
