"""Convolutions stored as input maps (format 3): keys unfolded when read are the keys the layer multiplied, every
padding mode, stride, dilation, Conv1d and Conv2d; attend/explain/at_step/the certificates are exact from the
compact store; a resume equals the uninterrupted run; format-2 conv stores still read."""

from __future__ import annotations

import copy
import os
import shutil

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from helpers import TRAINER_KW, dual_output, rel_err, store_contents
from lightning_dualform import DualFormCallback, DualInference, StoreReader
from lightning_dualform.attend.certificate import certify_store
from lightning_dualform.store.format import FORMAT_VERSION
from lightning_dualform.record import rows as rows_mod
from lightning_dualform.layers import conv_maps, keys_of, project_maps, weight_matrix
from lightning_dualform.store import conv as store_conv

HERE = os.path.dirname(__file__)
V2_CONV = os.path.join(HERE, "data", "store_v2_conv.h5")

GEOMETRIES = {
    "2d-zeros-stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 7, 6)),
    "2d-reflect-dilation": (
        lambda: nn.Conv2d(2, 3, (3, 2), padding=2, dilation=(2, 1), padding_mode="reflect", bias=False),
        (2, 2, 7, 6),
    ),
    "2d-replicate": (lambda: nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate"), (1, 2, 5, 5)),
    "2d-circular-stride": (lambda: nn.Conv2d(2, 3, 3, stride=(1, 2), padding=1, padding_mode="circular"), (2, 2, 6, 7)),
    "2d-same-even": (lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), (2, 2, 6, 6)),
    "2d-same-even-reflect": (lambda: nn.Conv2d(2, 3, (2, 4), padding="same", padding_mode="reflect"), (2, 2, 6, 6)),
    "2d-valid": (lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2), (2, 2, 9, 9)),
    "1d-circular-dilation": (
        lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="circular"),
        (2, 2, 11),
    ),
    "1d-same-even-replicate": (
        lambda: nn.Conv1d(2, 3, 2, padding="same", padding_mode="replicate", bias=False),
        (2, 2, 9),
    ),
    "1d-unbatched": (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 8)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_maps_unfold_to_the_keys_the_layer_multiplies(name):
    torch.manual_seed(0)
    make, shape = GEOMETRIES[name]
    layer, x = make().double(), torch.randn(*shape, dtype=torch.float64)
    keys, _ = keys_of(layer, x)  # F.unfold of the padded input
    maps, geom = conv_maps(layer, x)
    # the store's numpy unfolding (store/conv.py), from the map as it is stored (channel-last pixel rows)
    pixels = maps.movedim(1, -1).reshape(-1, maps.shape[1]).numpy()
    unfolded = store_conv.unfold(store_conv.maps_from_pixels(pixels, geom), geom)
    np.testing.assert_array_equal(unfolded, keys.numpy())
    # the layer is its weight times those keys: the real output, row by row
    out = layer(x).detach()
    out = out if out.dim() == maps.dim() else out.unsqueeze(0)
    rows = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2).reshape(-1, out.shape[1])
    ref = torch.from_numpy(unfolded) @ weight_matrix(layer).t() + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(rows, ref.detach(), rtol=1e-12, atol=1e-12)
    # K Z as a convolution with Z's columns as filters (the sketch's projection) is K @ Z
    z = torch.randn(geom.d_in, 5, dtype=torch.float64)
    torch.testing.assert_close(project_maps(geom, maps, z), keys @ z, rtol=1e-12, atol=1e-12)


class Zoo(L.LightningModule):
    """Convolutions of every padding mode on one (B, 2, 7, 6) input, and a Conv1d over it flattened."""

    def __init__(self, opt: str = "sgd"):
        super().__init__()
        self.opt = opt
        self.convs = nn.ModuleDict({k: GEOMETRIES[k][0]() for k in (
            "2d-zeros-stride", "2d-reflect-dilation", "2d-replicate", "2d-circular-stride", "2d-same-even-reflect")})
        self.c1d = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, padding_mode="circular")
        width = (
            sum(c(torch.zeros(1, 2, 7, 6)).numel() for c in self.convs.values())
            + self.c1d(torch.zeros(1, 2, 42)).numel()
        )
        self.head = nn.Linear(width, 3)

    def features(self, x):
        b = x.shape[0]
        hs = [torch.tanh(c(x)).reshape(b, -1) for c in self.convs.values()]
        hs.append(torch.tanh(self.c1d(x.reshape(b, 2, 42))).reshape(b, -1))
        return torch.cat(hs, 1)

    def forward(self, x):
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.opt == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.02, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def _data(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 2, 7, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


class _Snapshots(L.Callback):
    """The model after every optimizer step (global step -> a copy)."""

    def __init__(self):
        self.models = {}

    def on_train_start(self, trainer, pl_module):
        self.models[trainer.global_step] = copy.deepcopy(pl_module).cpu()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.models[trainer.global_step] = copy.deepcopy(pl_module).cpu()


def _fit(path, model, epochs: int = 2, **cb_kw):
    torch.manual_seed(0)
    snaps = _Snapshots()
    cb = DualFormCallback(path, **cb_kw)
    L.Trainer(max_epochs=epochs, callbacks=[snaps, cb], **TRAINER_KW).fit(
        model, torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False))
    return cb, snaps


def _conv_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}


def _real_rows(module, x):
    """The real layer's output rows (float64), one per (example, output location)."""
    m = copy.deepcopy(module).double()
    out = m(x.double()).detach()
    return out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2).reshape(-1, out.shape[1])


@pytest.fixture(scope="module")
def zoo_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    model = Zoo()
    cb, snaps = _fit(d / "zoo.h5", model)
    return cb, snaps, model


def test_compact_store_is_exact_through_attend_explain_and_at_step(zoo_store):
    cb, snaps, model = zoo_store
    convs = _conv_layers(model)
    with StoreReader(cb.store_path) as s:
        assert s.meta.format_version == FORMAT_VERSION >= 3
        for name in convs:
            lay = s.layer(name)
            assert lay.layout == "maps" and lay.geometry is not None
            assert lay.attrs["certificate_exact"], (name, lay.attrs)
            g = lay._g
            e = g["step"].shape[0]  # one metadata entry per (example, call) ...
            assert e == 2 * 16 and lay.n_rows == e * lay.geometry.locations  # ... virtual rows per location
            assert g["keys"].shape == (e * lay.geometry.pixels, lay.geometry.in_channels)
    x = torch.randn(3, 2, 7, 6, generator=torch.Generator().manual_seed(5))
    inputs = {n: (x.reshape(3, 2, 42) if n == "c1d" else x) for n in convs}
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        for name, m in convs.items():
            keys, _ = keys_of(m, inputs[name])
            res = di.attend(name, keys, top_k=3)
            assert rel_err(res.dual.double(), _real_rows(m, inputs[name])) <= 1e-5, name
            assert res.max_rel_err <= 1e-5
            # the model after 2 of the 4 steps: from a prefix of the compact rows
            mid = di.attend(name, keys, top_k=3, at_step=2)
            real_mid = _real_rows(dict(snaps.models[2].named_modules())[name], inputs[name])
            assert rel_err(mid.dual.double(), real_mid) <= 1e-5, name
            assert rel_err(mid.dual.double(), _real_rows(m, inputs[name])) > 1e-3  # (the step matters)
            # the same numbers as torch's own unfolding of the raw file gives
            assert rel_err(res.dual.double(), dual_output(cb.store_path, name, keys)) <= 1e-9
        ex = di.explain(model, x, top_k=2)
        for name, m in convs.items():
            assert rel_err(ex[name].dual.double(), _real_rows(m, inputs[name])) <= 1e-5, name
        assert max(di.verify().values()) <= 1e-5


def test_virtual_rows_read_in_any_blocks(zoo_store):
    cb, _, model = zoo_store
    with StoreReader(cb.store_path) as s:
        lay = s.layer("convs.2d-circular-stride")
        whole = lay.read(0, lay.n_rows)
        loc = lay.geometry.locations
        assert (whole["position"][:loc] == np.arange(loc)).all()
        assert (whole["index"][:loc] == 0).all() and (whole["index"][loc: 2 * loc] == 1).all()
        for block in (1, 7, loc, loc + 3):
            parts = [lay.read(a, a + block) for a in range(0, lay.n_rows, block)]
            for col, v in whole.items():
                np.testing.assert_array_equal(np.concatenate([p[col] for p in parts]), v, err_msg=f"{col} {block}")
        assert lay.rows_before(s.first_step + 2) == 16 * loc  # two steps of 8 examples
        blk = lay.read_maps(5, 5 + 2 * loc, ("values", "index"))
        assert blk["maps"].shape == (3, 2, 7, 6) and blk["skip"] == 5 and blk["rows"] == 2 * loc
        np.testing.assert_array_equal(blk["values"], whole["values"][5: 5 + 2 * loc])
        np.testing.assert_array_equal(
            store_conv.unfold(blk["maps"], lay.geometry)[5 : 5 + 2 * loc], whole["keys"][5 : 5 + 2 * loc]
        )


def test_conv_bytes_on_disk_are_the_maps_and_gradients(zoo_store):
    """The layout's bytes: the keys dataset holds each input value once (not once per kernel offset)."""
    cb, _, _ = zoo_store
    with StoreReader(cb.store_path) as s:
        lay = s.layer("convs.2d-replicate")  # 3x3 kernel, stride 1: unfolded keys would be 9x the map
        e = lay._g["step"].shape[0]
        assert lay._g["keys"].shape[0] * lay._g["keys"].shape[1] == e * 2 * 7 * 6
        assert lay._g["values"].shape == (lay.n_rows, 3)


def test_full_and_sketch_certificates_catch_one_corrupted_map_value(zoo_store, tmp_path, monkeypatch):
    cb, _, _ = zoo_store
    path = str(tmp_path / "bad.h5")
    shutil.copy(cb.store_path, path)
    name = "convs.2d-reflect-dilation"  # reflect padding: a border value enters several keys
    with h5py.File(path, "r+") as f:
        ds = f["layers"][name]["keys"]
        ds[5, 1] = ds[5, 1] + 0.25  # (through HDF5's filters: the chunk's checksum stays valid)
    cert = certify_store(path)
    assert not cert[name].exact and cert[name].rel_err > 1e-4
    assert all(c.exact for n, c in cert.items() if n != name)

    # the certificate made as training goes projects the rows handed to the writer: corrupt one map value there
    real = rows_mod.gather_rows
    seen = {"n": 0}

    def corrupt(parts, row_dtype):
        out = real(parts, row_dtype)
        if parts[0][0].geometry is not None and parts[0][0].keys.shape[1:] == (2, 7, 6):
            seen["n"] += 1
            if seen["n"] == 7:  # one layer, one step
                out[0][3, 0] += 0.5
        return out

    monkeypatch.setattr(rows_mod, "gather_rows", corrupt)
    model = Zoo()
    bad, _ = _fit(tmp_path / "sketch.h5", model, check_every=1000)
    flagged = [n for n, c in bad.certificate.items() if not c["exact"]]
    assert len(flagged) == 1 and flagged[0] in _conv_layers(model), bad.certificate


class ChannelsLastZoo(Zoo):
    """The zoo on inputs channel-last in memory (its 2-D maps' pixel rows are then a view, not a copy)."""

    def features(self, x):
        return super().features(x.contiguous(memory_format=torch.channels_last))


def test_maps_in_either_memory_layout_and_through_h5py_store_the_same_rows(tmp_path, monkeypatch):
    """A convolution's maps channel-last in memory, and a store whose chunks go through h5py instead of the
    writer's own appends: each store's rows rebuild its trained weights, and the same fit stores the same bytes
    either way."""
    from lightning_dualform.store._chunks import ChunkAppender

    torch.manual_seed(1)
    last, _ = _fit(tmp_path / "last.h5", ChannelsLastZoo())
    cert = certify_store(last.store_path)
    assert all(c.exact and c.rel_err < 1e-5 for c in cert.values()), cert
    stores = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(ChunkAppender, "usable", staticmethod(lambda ds: False))
        torch.manual_seed(1)
        stores.append(_fit(tmp_path / f"{direct}.h5", Zoo())[0].store_path)
    a, b = (store_contents(p) for p in stores)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_adamw_compact_store_is_exact(tmp_path):
    model = Zoo("adamw")
    cb, _ = _fit(tmp_path / "a.h5", model, epochs=1)
    x = torch.randn(2, 2, 7, 6)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        for name in ("convs.2d-same-even-reflect", "c1d"):
            m = dict(model.named_modules())[name]
            xi = x.reshape(2, 2, 42) if name == "c1d" else x
            res = di.attend(name, keys_of(m, xi)[0], top_k=2)
            assert cb.certificate[name]["exact"]
            assert rel_err(res.dual.double(), _real_rows(m, xi)) <= 1e-5, name


def test_resume_equals_uninterrupted(tmp_path):
    def run(path, ckdir, resume=None):
        L.seed_everything(0, verbose=False)
        model = Zoo()
        ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, save_top_k=-1, every_n_epochs=1)
        cb = DualFormCallback(path, overwrite=resume is None, chunk_rows=64)
        kw = {**TRAINER_KW, "enable_checkpointing": True}
        L.Trainer(max_epochs=3, callbacks=[ck, cb], **kw).fit(
            model, torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False), ckpt_path=resume)
        return cb

    run(tmp_path / "full.h5", tmp_path / "c1")
    run(tmp_path / "part.h5", tmp_path / "c2")
    ckpt = sorted(p for p in os.listdir(tmp_path / "c2") if p.startswith("epoch=0"))[0]
    cb = run(tmp_path / "part.h5", tmp_path / "c3", resume=tmp_path / "c2" / ckpt)
    a, b = store_contents(str(tmp_path / "full.h5")), store_contents(str(tmp_path / "part.h5"))
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k
    assert all(c["exact"] for c in cb.certificate.values())


def test_format_2_conv_store_still_reads(tmp_path):
    path = str(tmp_path / "v2.h5")
    shutil.copy(V2_CONV, path)
    with StoreReader(path) as s:
        assert s.meta.format_version == 2
        c2 = s.layer("c2")
        assert c2.layout == "rows" and c2.geometry is None and c2.n_rows == 4 * 8 * 9
        keys = c2.read(0, 10, ("keys",))["keys"]
        assert keys.shape == (10, 27)
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        assert max(di.verify().values()) <= 1e-5
        res = di.attend("c2", keys, top_k=2, reuse_certificate=False)
        assert rel_err(res.dual.double(), dual_output(path, "c2", torch.from_numpy(keys))) <= 1e-9
    # a run of this library cannot continue it: its convolutions would be written as maps
    from lightning_dualform.store.writer import stored_settings

    assert stored_settings(path)["layers"]["c2"][-1] == "rows"


def test_a_conv_whose_maps_change_size_is_left_out_with_why(tmp_path):
    class Var(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(2, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def training_step(self, batch, batch_idx):
            x = batch[0][:, :, : 8 + 2 * batch_idx]  # a longer sequence every batch
            return nn.functional.cross_entropy(self.head(self.c(x).mean(-1)), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 2, 12, generator=g), torch.randint(0, 2, (16,), generator=g))
    cb = DualFormCallback(tmp_path / "v.h5")
    with pytest.warns(UserWarning, match="changed size"):
        L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(Var(), torch.utils.data.DataLoader(ds, batch_size=8))
    with StoreReader(cb.store_path) as s:
        assert s.layers == ["head"] and "changed size" in s.meta.dropped_layers["c"]


def test_rebuild_layer_script_rebuilds_a_conv_from_maps(zoo_store):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rebuild_layer", os.path.join(HERE, "..", "docs", "rebuild_layer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cb, _, model = zoo_store
    for name, m in _conv_layers(model).items():
        w, b = mod.rebuild(cb.store_path, name)
        assert rel_err(torch.from_numpy(w), weight_matrix(m).double()) <= 1e-5, name
        if m.bias is not None:
            assert rel_err(torch.from_numpy(b), m.bias.detach().double()) <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_records_and_attends_compact_maps(tmp_path):
    model = Zoo()
    cb = DualFormCallback(tmp_path / "g.h5")
    L.Trainer(max_epochs=1, accelerator="gpu", devices=1, callbacks=[cb], **TRAINER_KW).fit(
        model, torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False))
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    model = model.cpu()
    x = torch.randn(2, 2, 7, 6)
    with DualInference(cb.store_path, device="cuda", accumulate=torch.float64) as di:
        for name, m in _conv_layers(model).items():
            xi = x.reshape(2, 2, 42) if name == "c1d" else x
            res = di.attend(name, keys_of(m, xi)[0], top_k=2)
            assert rel_err(res.dual.double().cpu(), _real_rows(m, xi)) <= 1e-5, name
