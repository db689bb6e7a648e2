"""Hostile files: damaged, truncated, foreign or inconsistent stores give StoreError, never a crash or a hang."""

from __future__ import annotations

import io
import os
import re
import stat
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


def _mutated_copy(valid_store, tmp_path, edit):
    path = tmp_path / "m.h5"
    path.write_bytes(open(valid_store, "rb").read())
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda f: f["layers"].__delitem__("net.0"), r"'layer_order' names \['net.0'\], which have no group"),
    (lambda f: f.attrs.__setitem__("layer_order", '["net.2", "nonexistent"]'), r"names \['nonexistent'\].*does not name"),
    (lambda f: f.copy("layers/net.2", "layers/net.9"), r"does not name the groups \['net.9'\]"),
], ids=["group deleted", "order edited", "group copied"])
def test_layer_order_and_layer_groups_must_agree(valid_store, tmp_path, capsys, edit, match):
    # a layer missing or added would silently make another one the output layer (store-only influence)
    path = _mutated_copy(valid_store, tmp_path, edit)
    with pytest.raises(StoreError, match=match):
        StoreReader(path)
    from lightning_dualform.cli import main
    assert main(["info", str(path)]) == 2 and "damaged" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["weight_final", "bias_final"])
def test_a_complete_store_without_its_final_weights_is_damaged(valid_store, tmp_path, name):
    path = _mutated_copy(valid_store, tmp_path, lambda f: f["layers"]["net.2"].__delitem__(name))
    with pytest.raises(StoreError, match=f"net.2.*no '{name}', which a complete store holds"):
        StoreReader(path)


def test_a_chunk_whose_checksum_fails_is_named_with_its_layer_and_rows(valid_store, tmp_path):
    path = tmp_path / "rot.h5"
    path.write_bytes(open(valid_store, "rb").read())
    with h5py.File(path, "r") as f:
        chunk = f["layers/net.0/keys"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:  # one bit of the first chunk of keys flips on disk
        fh.seek(chunk.byte_offset + 5)
        b = fh.read(1)
        fh.seek(chunk.byte_offset + 5)
        fh.write(bytes([b[0] ^ 0x04]))
    hint = r"Fletcher-32 checksum does not match.*restore the file from a copy"
    with pytest.raises(StoreError, match=r"dataset 'layers/net.0/keys': .*filter returned failure.*" + hint):
        StoreReader(path)  # the probe reads small datasets whole
    with StoreReader(path, probe=False) as s:  # (a large one is read when asked)
        lay = s.layer("net.0")
        with pytest.raises(StoreError, match=r"layer 'net.0': read\(0, \d+\) failed .*" + hint):
            lay.read(0, lay.n_rows)


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


# ------------------------------------------------------------------------------------------------------
# errors that say what is wrong (issue 21, class 3)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [-1.0, -1e300, 0.5, -0.5, 2.25])
def test_an_impossible_optimizer_step_count_is_a_store_error_and_exit_2(adamw_store, tmp_path, capsys, step):
    """``state/weight@step = -1`` made the bias corrections divide by zero (ZeroDivisionError, exit 1)."""
    from lightning_dualform.cli import main

    path = tmp_path / "s.h5"
    path.write_bytes(open(adamw_store, "rb").read())
    with h5py.File(path, "r+") as f:
        f["layers/net.0/state/weight"].attrs["step"] = step
    with pytest.raises(StoreError, match=r"'step' is .*expected a whole number of steps"):
        _attend_all(str(path))
    queries = _npy(tmp_path, np.zeros((1, 6)))
    assert main(["attend", str(path), "--queries", queries, "--layer", "net.0", "--quiet"]) == 2
    assert "whole number of steps" in capsys.readouterr().err


def _npy(tmp_path, q: np.ndarray, name: str = "q.npy") -> str:
    p = tmp_path / name
    np.save(p, q)
    return str(p)


def test_queries_that_are_complex_or_beyond_float32_are_refused_naming_the_query(valid_store):
    """Every kind of query array either answers as its float64 values do, or is refused with an error that
    names the queries: complex ones lost their imaginary part, float64 beyond float32 gave NaN and a warning
    that blamed the store."""
    from lightning_dualform import DualInference

    big = np.finfo(np.float32).max
    rng = np.random.default_rng(0)
    with DualInference(valid_store, device="cpu", accumulate=torch.float64) as di:
        d = di.layer("net.0").d_in
        base = rng.standard_normal((3, d))
        ref = di.attend("net.0", torch.from_numpy(base), top_k=1).dual.double()
        cases = {
            "complex128": (base + 1j * base, TypeError, "complex"),
            "complex64": ((base + 0.5j).astype(np.complex64), TypeError, "complex"),
            "complex tensor": (torch.from_numpy(base + 0j), TypeError, "complex"),
            "float64 beyond float32": (np.where(np.arange(d) == 2, 4 * float(big), base), ValueError,
                                       r"beyond float32.s range \(query rows \[0, 1, 2\]"),
            "float64 just beyond": (np.full((1, d), 1.0000001 * float(big)), ValueError, "beyond float32's range"),
            "object array": (base.astype(object), TypeError, "real numbers"),
            "strings": (np.array([["1"] * d]), TypeError, "real numbers"),
        }
        for name, (q, err, match) in cases.items():
            with pytest.raises(err, match=match):
                di.attend("net.0", q, top_k=1)
        # what is accepted answers as the same values in float64 do
        for q in (base.astype(np.float32), base.astype(np.float16), torch.from_numpy(base).to(torch.bfloat16),
                  np.round(base).astype(np.int64), np.full((1, d), float(big) / 1e30)):
            got = di.attend("net.0", q, top_k=1).dual.double()
            want = di.attend("net.0", torch.as_tensor(np.asarray(torch.as_tensor(q).double())), top_k=1).dual.double()
            assert torch.allclose(got, want, rtol=1e-5, atol=0), q.dtype
        assert torch.isfinite(ref).all()


def test_cli_and_viewer_uploads_refuse_complex_and_out_of_range_queries(valid_store, tmp_path, capsys):
    from lightning_dualform.cli import main
    from lightning_dualform.cli.inputs import UsageError, load_npy_bytes

    d = 6
    for name, q, match in (("c.npy", np.ones((2, d)) * (1 + 2j), "complex numbers"),
                           ("big.npy", np.full((2, d), 1e39), "beyond float32's range")):
        assert main(["attend", valid_store, "--queries", _npy(tmp_path, q, name), "--quiet"]) == 2
        assert re.search(match, capsys.readouterr().err)
        buf = io.BytesIO()
        np.save(buf, q)
        with pytest.raises(UsageError, match=match):
            load_npy_bytes(buf.getvalue(), name)
    pt = tmp_path / "c.pt"
    torch.save(torch.ones(2, d, dtype=torch.complex64), pt)
    assert main(["attend", valid_store, "--queries", str(pt), "--quiet"]) == 2
    assert "complex numbers" in capsys.readouterr().err


def test_attend_after_close_says_closed_not_damaged(valid_store):
    from lightning_dualform import DualInference

    di = DualInference(valid_store, device="cpu")
    di.close()
    for call in (lambda: di.attend("net.0", torch.zeros(1, 6)), lambda: di.layer("net.0"), di.refresh):
        with pytest.raises(RuntimeError, match="this DualInference of .* is closed"):
            call()


def test_a_store_reader_used_after_close_says_closed_not_damaged(valid_store):
    """h5py answers `name in group` on a closed file with False: a closed reader's final weights read as None,
    silently, unless the reader checks first."""
    s = StoreReader(valid_store)
    layer, queries = s.layer("net.0"), s.queries("test")
    assert layer.weight_final is not None
    s.close()
    for call in (lambda: layer.weight_final, lambda: layer.read(0, 2), lambda: layer.updates(),
                 lambda: layer.rows_before(1), lambda: queries.layer_rows("net.0")):
        with pytest.raises(RuntimeError, match="this reader was closed .* open the store again"):
            call()


def test_top_k_0_is_refused_by_the_cli_and_marked_not_computed_by_the_api(valid_store, capsys):
    from lightning_dualform import DualInference
    from lightning_dualform.cli import main
    from lightning_dualform.cli.view import NOT_COMPUTED, ViewApp

    assert main(["attend", valid_store, "--top-k", "0", "--quiet"]) == 2
    assert "--top-k 0: expected 1 or more" in capsys.readouterr().err
    with DualInference(valid_store, device="cpu") as di:
        app = ViewApp(valid_store, di)
        res = app.attend({"top_k": ["0"], "layer": ["net.2"]})["layers"]["net.2"]
        assert res["top"] == res["proponents"] == res["opponents"] == NOT_COMPUTED
        assert res["dual"] is not None  # the rest of the answer is there
        res = app.attend({"top_k": ["2"], "layer": ["net.2"]})["layers"]["net.2"]
        assert isinstance(res["top"], dict) and len(res["top"]["score"][0]) == 2


@pytest.fixture(scope="module")
def view_server(valid_store):
    import threading

    from lightning_dualform import DualInference
    from lightning_dualform.cli.view import ViewApp, ViewServer

    di = DualInference(valid_store, device="cpu")
    srv = ViewServer(ViewApp(valid_store, di), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()
    di.close()


def _get(srv, path: str, hosts: list[str] | None = None) -> tuple[int, dict]:
    import http.client
    import json

    port = srv.server_address[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.putrequest("GET", path, skip_host=True)
    for h in hosts if hosts is not None else [f"127.0.0.1:{port}"]:
        conn.putheader("Host", h)
    conn.endheaders()
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def test_the_viewer_answers_hostile_parameters_with_400_never_500(view_server):
    """A property loop over parameter values (numbers past 64 bits, negative, malformed, long) on every
    endpoint: each answer is 200 or 4xx with one line, never a 500 (the issue: `train=<31 digits>` gave 500)."""
    import random
    import urllib.parse

    huge = "9" * 31
    assert _get(view_server, f"/api/images?train={huge}")[0] == 400
    values = ["0", "1", "-1", "3", huge, "-" + huge, str(2**63), str(-(2**63) - 1), "", "x", "1e3", "0:" + huge,
              "3,17", "all", "net.0", "net.2", "pred", "label", "none", "raw", "unit", "pattern", "example", "test",
              "q" * 200, "1,-5," + huge, " 3", "nan"]
    params = {"/api/attend": ["split", "index", "upload", "layer", "top_k", "by", "contribution_to", "at_step",
                              "step_buckets", "score"],
              "/api/images": ["split", "index", "train", "upload"], "/api/queries": ["split"], "/api/info": []}
    rng = random.Random(21)
    statuses = []
    for _ in range(60):
        ep = rng.choice(list(params))
        q = {p: rng.choice(values) for p in params[ep] if rng.random() < 0.4}
        status, body = _get(view_server, ep + ("?" + urllib.parse.urlencode(q) if q else ""))
        assert status < 500, (ep, q, body)
        assert status == 200 or ("\n" not in body["error"] and body["error"]), (ep, q, body)
        statuses.append(status)
    assert 200 in statuses and 400 in statuses


def test_the_viewer_checks_every_host_header(view_server):
    port = view_server.server_address[1]
    good = f"127.0.0.1:{port}"
    assert _get(view_server, "/api/cache", [good])[0] == 200
    for hosts in ([good, "evil.example"], ["evil.example", good], [good, good], []):
        status, body = _get(view_server, "/api/cache", hosts)
        assert status == 403 and "one Host header" in body["error"], hosts


@pytest.mark.parametrize("umask,plot", [(0o022, True), (0o077, False), (0o002, False)])
def test_json_and_plot_outputs_honour_the_umask(valid_store, tmp_path, umask, plot):
    """``--json`` and ``--plot`` files get the permissions any new file gets (they were 0600 whatever the
    umask), and an existing file keeps its own; they are still written whole or not at all."""
    from lightning_dualform.cli import main

    out, picture = tmp_path / "a.json", tmp_path / "a.png"
    old = os.umask(umask)
    try:
        assert main(["attend", valid_store, "--json", str(out), *(["--plot", str(picture)] if plot else []), "--quiet"]) == 0
        (tmp_path / "ref").write_text("")
        want = stat.S_IMODE(os.stat(tmp_path / "ref").st_mode)
        assert stat.S_IMODE(os.stat(out).st_mode) == want == 0o666 & ~umask
        assert not plot or stat.S_IMODE(os.stat(picture).st_mode) == want
        os.chmod(out, 0o640)
        assert main(["attend", valid_store, "--json", str(out), "--quiet"]) == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o640
    finally:
        os.umask(old)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


def test_cli_options_beyond_any_machine_are_usage_errors(tmp_path, capsys):
    """A property loop over numbers no machine holds: each option either takes them (bounded by the store) or
    refuses them in one line with exit 2, never an OverflowError (`view --cache <400 digits>` gave exit 1)."""
    from lightning_dualform.cli import main
    from lightning_dualform.cli.inputs import UsageError
    from lightning_dualform.cli.view import parse_cache

    for text in ("9" * 400, "1e400", "9" * 30 + "T", str(2**62) + "G"):
        with pytest.raises(UsageError, match="--cache"):
            parse_cache(text)
    for lr in ("nan", "inf", "-1", "0"):
        assert main(["demo", "--out", str(tmp_path / "d"), "--lr", lr, "--no-plot", "--quiet"]) == 2
        assert f"--lr {float(lr)}: expected a positive, finite learning rate" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_a_learning_rate_of_nan_is_refused_when_recorded_not_called_damaged_later(tmp_path):
    from torch import nn

    from lightning_dualform import DualFormRecorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=float("nan"))
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    path = tmp_path / "nan.h5"
    with pytest.raises(Exception, match=r"optimizer step 0 of layer '0' is not finite \(weight lr nan.*learning rate") as got:
        with DualFormRecorder(path, model, opt) as rec:
            for s in range(2):
                rec.batch(indices=torch.arange(8 * s, 8 * s + 8), labels=y[8 * s: 8 * s + 8])
                nn.functional.cross_entropy(model(x[8 * s: 8 * s + 8]), y[8 * s: 8 * s + 8]).backward()
                opt.step()
                opt.zero_grad()
    # the advice fits the error: not the disk's, and not the callback's name in a plain loop
    assert "free disk space" not in str(got.value) and "DualFormCallback" not in str(got.value)
    with StoreReader(path) as s:  # what it kept opens: no step, not "damaged"
        assert s.n_steps == 0 and s.status == "recording"
