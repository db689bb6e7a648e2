"""``lightning-dualform view``: the API answers what ``attend --json`` writes, bad parameters get 400s, the
server binds to loopback only and serves nothing outside its assets, and (marked ``browser``) the page
works in a real headless Chromium."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest

from lightning_dualform import DualInference
from lightning_dualform.cli import main
from lightning_dualform.cli.view import ViewApp, ViewServer
from lightning_dualform.cli.view_http import ASSETS, asset_table

CHROMIUM = os.environ.get("LIGHTNING_DUALFORM_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> str:
    """The demo on 1,500 MNIST digits (1,200 for training, 10 steps per epoch), two epochs: an image store with recorded test queries."""
    out = str(tmp_path_factory.mktemp("viewdemo"))
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        assert main(["demo", "--out", out, "--epochs", "2", "--limit", "1500", "--quiet", "--no-plot"]) == 0
    return os.path.join(out, "mnist.h5")


@pytest.fixture(scope="module")
def server(demo_store):
    di = DualInference(demo_store, device="cpu", cache="auto")
    srv = ViewServer(ViewApp(demo_store, di), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    di.close()


def request(srv, path: str, method: str = "GET", body: bytes | None = None, host: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    headers = {} if host is None else {"Host": host}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


def get_json(srv, path: str):
    status, ctype, data = request(srv, path)
    assert ctype == "application/json", (path, status, data[:200])
    return status, json.loads(data)


def _test_indices(store: str) -> np.ndarray:
    with DualInference(store, device="cpu") as di:
        return di.store.queries("test").index


def cli_json(tmp_path, *argv) -> dict:
    out = tmp_path / "cli.json"
    assert main(["attend", *map(str, argv), "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------------
# the API answers what the command line writes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    {},
    {"at_step": "7", "by": "example"},
    {"contribution_to": "label", "step_buckets": "7"},
    {"contribution_to": "none", "layer": "net.0,net.2", "top_k": "3"},
    {"layer": None},  # every layer, as without --layer
])
def test_api_attend_equals_cli_json(server, demo_store, tmp_path, capsys, extra) -> None:
    index = int(_test_indices(demo_store)[7])
    params = {"split": "test", "index": str(index), "layer": "net.4", "top_k": "5", **extra}
    params = {k: v for k, v in params.items() if v is not None}
    status, api = get_json(server, "/api/attend?" + urllib.parse.urlencode(params))
    assert status == 200, api
    flags = {"split": "--split", "index": "--index", "layer": "--layer", "top_k": "--top-k", "at_step": "--at-step",
             "by": "--by", "contribution_to": "--contribution-to", "step_buckets": "--step-buckets"}
    argv = [demo_store] + [x for k, v in params.items() for x in (flags[k], v)]
    assert api == cli_json(tmp_path, *argv)
    capsys.readouterr()
    assert api["queries"]["index"] == [index] and api["settings"]["store"] == os.path.abspath(demo_store)


def test_api_attend_of_an_upload_equals_cli_json_of_the_file(server, demo_store, tmp_path, monkeypatch, capsys) -> None:
    rows = np.random.default_rng(0).random((2, 28, 28), dtype=np.float32)  # images: flattened to 784
    buf = io.BytesIO()
    np.save(buf, rows)
    status, _, data = request(server, "/api/upload?name=q.npy", "POST", buf.getvalue())
    up = json.loads(data)
    assert status == 200 and up["n"] == 2 and up["d"] == 784 and up["layers"] == ["net.0"]
    status, api = get_json(server, f"/api/attend?upload={up['upload']}&top_k=4")
    assert status == 200, api
    (tmp_path / "q.npy").write_bytes(buf.getvalue())
    monkeypatch.chdir(tmp_path)  # the source is the file name as given: "q.npy" both ways
    assert api == cli_json(tmp_path, demo_store, "--queries", "q.npy", "--top-k", "4")
    capsys.readouterr()
    status, imgs = get_json(server, f"/api/images?upload={up['upload']}")
    assert status == 200 and len(imgs["images"]) == 2 and imgs["images"][0]["h"] == 28


def test_info_queries_and_images(server, demo_store) -> None:
    status, info = get_json(server, "/api/info")
    assert status == 200 and [l["name"] for l in info["layers"]] == ["net.0", "net.2", "net.4"]
    assert info["splits"][0]["name"] == "test" and info["splits"][0]["inputs"] and info["train_inputs"]
    assert info["cache"]["budget"] > 0 and all(l["certificate"]["exact"] for l in info["layers"])
    status, q = get_json(server, "/api/queries?split=test")
    assert q["index"] == _test_indices(demo_store).tolist()
    status, imgs = get_json(server, f"/api/images?split=test&index={q['index'][0]},{q['index'][1]}")
    assert status == 200 and [i["h"] for i in imgs["images"]] == [28, 28]
    with DualInference(demo_store, device="cpu") as di:
        raw = di.store.queries("test").inputs[0].reshape(28, 28)
    pix = np.array(imgs["images"][0]["pixels"]).reshape(28, 28)
    np.testing.assert_allclose(pix / 255.0, (raw - raw.min()) / (raw.max() - raw.min()), atol=0.5 / 255 + 1e-6)
    status, imgs = get_json(server, "/api/images?train=0,1,2")
    assert status == 200 and len(imgs["images"]) == 3
    status, c = get_json(server, "/api/cache")
    assert status == 200 and "hits" in c["cache_text"]


def test_api_influence_from_the_store_and_with_the_model(server, demo_store) -> None:
    """Without a model: first-order influence on the prediction's margin through the output layer, the same as
    /api/attend's; the replaying methods are refused with what to do. With --model: every layer, as influence()."""
    import torch

    from lightning_dualform.attribute import influence
    from lightning_dualform.attribute.views import influence_answer
    from lightning_dualform.cli.demo import PaperMLP
    from lightning_dualform.cli.influence import load_final_weights

    index = int(_test_indices(demo_store)[3])
    status, inf = get_json(server, f"/api/influence?split=test&index={index}&top_k=4")
    assert status == 200, inf
    _, att = get_json(server, f"/api/attend?split=test&index={index}&top_k=4")
    assert inf == att["influence"] and inf["scope"] == "output layer" and "through layer net.4 only" in inf["label"]
    assert inf["queries"][0]["class"] == att["layers"]["net.4"]["units"][0]
    assert len(inf["queries"][0]["proponents"]) == 4
    status, err = get_json(server, f"/api/influence?split=test&index={index}&method=metagradient")
    assert status == 400 and "--model" in err["error"]
    _, info = get_json(server, "/api/info")
    assert [m["layers"] for m in info["influence"]["methods"]] == ["output"] and info["influence"]["model"] is None
    with DualInference(demo_store, device="cpu") as di:
        model = PaperMLP()
        load_final_weights(model, di.store)
        app = ViewApp(demo_store, di, model, "lightning_dualform.cli.demo:PaperMLP")
        assert [m["method"] for m in app.info({})["influence"]["methods"]] == [
            "first_order", "first_order", "every_step", "metagradient"]
        got = app.influence({"split": ["test"], "index": [str(index)], "top_k": ["4"]})
        qs = di.store.queries("test")
        x = torch.as_tensor(qs.inputs_at(np.flatnonzero(qs.index == index))).float()
        pred = model(x).argmax(-1)
        want = influence_answer(influence(di.store, model, x, pred), 4, list(di.layers), classes=pred)
        assert got == {**want, "note": None} and got["layers"] == ["net.0", "net.2", "net.4"]
        assert "all 3 recorded layers" in got["label"]
        out = app.influence({"split": ["test"], "index": [str(index)], "layers": ["output"]})
        assert out["scope"] == "output layer"


# ------------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------------
BAD = {
    "unknown parameter": "/api/attend?split=test&index={i}&colour=red",
    "top_k not a number": "/api/attend?split=test&index={i}&top_k=five",
    "negative top_k": "/api/attend?split=test&index={i}&top_k=-1",
    "top_k beyond the memory": "/api/attend?split=test&index={i}&top_k=10000000",
    "unknown layer": "/api/attend?split=test&index={i}&layer=fc9",
    "a layer list naming no layer": "/api/attend?split=test&index={i}&layer=,",
    "at_step before any row": "/api/attend?split=test&index={i}&at_step=0&top_k=2",
    "unknown split": "/api/attend?split=validate&index={i}",
    "index not recorded": "/api/attend?split=test&index=999999",
    "index not a number": "/api/attend?split=test&index=seven",
    "at_step outside the run": "/api/attend?split=test&index={i}&at_step=99999",
    "bad by": "/api/attend?split=test&index={i}&by=row",
    "bad contribution": "/api/attend?split=test&index={i}&contribution_to=biggest",
    "unit out of range": "/api/attend?split=test&index={i}&contribution_to=10",
    "zero step buckets": "/api/attend?split=test&index={i}&step_buckets=0",
    "parameter twice": "/api/attend?split=test&index={i}&top_k=3&top_k=4",
    "unknown upload": "/api/attend?upload=0123456789abcdef",
    "upload and split": "/api/attend?upload=x&split=test",
    "malformed query": "/api/attend?split=test&&index",
    "images without index": "/api/images?split=test",
    "images not numbers": "/api/images?train=a,b",
    "too many images": "/api/images?train=" + ",".join(map(str, range(300))),
    "info takes nothing": "/api/info?x=1",
    "bad influence method": "/api/influence?split=test&index={i}&method=exact",
    "every layer without a model": "/api/influence?split=test&index={i}&layers=all",
    "influence without index": "/api/influence?split=test",
    "asset with parameters": "/index.html?x=1",
}


@pytest.mark.parametrize("score", ["abs", "signed"])
def test_api_study_equals_a_dense_computation_over_the_store(server, demo_store, score) -> None:
    """The authors' measures of one query, against every stored row scored in float64 here."""
    from lightning_dualform import StoreReader

    index = int(_test_indices(demo_store)[3])
    status, res = get_json(server, f"/api/study?split=test&index={index}&score={score}")
    assert status == 200 and res["index"] == index and res["score"] == score
    with StoreReader(demo_store) as st:
        qs = st.queries("test")
        pos = int(np.flatnonzero(qs.index == index)[0])
        assert res["label"] == int(qs.label[pos]) and set(res["layers"]) == set(st.layers)
        for name, m in res["layers"].items():
            lay = st.layer(name)
            d = lay.read(0, lay.n_rows, ("keys", "label"))
            q = qs.layer_rows(name, np.array([pos]))["keys"][0].astype(np.float64)
            s = d["keys"].astype(np.float64) @ q
            if score == "abs":
                s = np.abs(s)
            totals = np.bincount(d["label"], weights=s, minlength=len(m["class_total"]))
            np.testing.assert_allclose(m["class_total"], totals, rtol=1e-4, atol=1e-6 * np.abs(s).sum())
            assert m["vote"] == int(np.argmax(totals)) and m["rows"] == lay.n_rows
            ranked = np.sort(s)[::-1]
            top = np.asarray(m["rank"]["score"])
            assert len(top) == min(500, lay.n_rows)
            np.testing.assert_allclose(top, ranked[: len(top)], rtol=1e-4, atol=1e-6 * ranked[0])
            # every listed row is a row with that score (labels by row, not re-sorted here)
            assert set(m["rank"]["label"]) <= set(d["label"].tolist())
            k = m["top1pct_rows"]
            assert k == int(np.ceil(0.01 * lay.n_rows))
            np.testing.assert_allclose(m["top1pct_share"], np.sort(np.abs(s))[::-1][:k].sum() / np.abs(s).sum(), rtol=1e-4)
            same = np.mean(np.asarray(m["rank"]["label"]) == res["label"])
            assert m["top_label_share"] == pytest.approx(same)
    for bad in ("score=max", "index=all", "index=-5"):
        status, err = get_json(server, f"/api/study?split=test&index={index}&{bad}".replace(f"index={index}&index", "index"))
        assert status == 400 and "\n" not in err["error"], (bad, err)


def test_bad_parameters_get_400_and_one_line(server, demo_store) -> None:
    i = int(_test_indices(demo_store)[0])
    for what, path in BAD.items():
        status, ctype, data = request(server, path.format(i=i))
        assert status == 400, (what, status, data)
        body = json.loads(data)
        assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], (what, body)
        assert "Traceback" not in body["error"], what


def test_bad_uploads_get_400(server, tmp_path) -> None:
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    wide = io.BytesIO()
    np.save(wide, np.zeros((1, 5), np.float32))
    nan = io.BytesIO()
    np.save(nan, np.full((1, 784), np.nan, np.float32))
    for what, body, name in [("pickle", pickled.getvalue(), "p.npy"), ("not npy", b"hello", "h.npy"),
                             ("no layer takes the width", wide.getvalue(), "w.npy"), ("NaN", nan.getvalue(), "n.npy"),
                             ("bad name", wide.getvalue(), "../../x.npy")]:
        status, _, data = request(server, "/api/upload?name=" + urllib.parse.quote(name), "POST", body)
        assert status == 400, (what, status, data)
        assert "\n" not in json.loads(data)["error"]


def test_binds_to_loopback_only_and_checks_the_host(server) -> None:
    assert server.server_address[0] == "127.0.0.1"
    status, _, data = request(server, "/api/info", host="attacker.example:80")  # DNS rebinding
    assert status == 403 and "127.0.0.1" in json.loads(data)["error"]
    status, _, _ = request(server, "/api/info", host=f"localhost:{server.server_address[1]}")
    assert status == 200
    # from another address of this machine, nothing listens on the port
    others = _non_loopback_addresses()
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for addr in others:
        with pytest.raises(OSError):
            socket.create_connection((addr, server.server_address[1]), timeout=2).close()


def _non_loopback_addresses() -> list[str]:
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    try:  # the address of the default route (no packet is sent for UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127."))


@pytest.mark.parametrize("path", [
    "/../view.py", "/../../../../etc/passwd", "/%2e%2e/view.py", "/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/view_assets/../view.py", "//etc/passwd", "/index.html/../../main.py", "/..%5Cview.py", "/view.py",
    "/main.py", "/" + os.path.join(ASSETS, "view.js"), "/./view.js/", "/etc/passwd%00.js",
])
def test_no_file_outside_the_assets(server, path) -> None:
    status, _, data = request(server, path)
    assert status in (400, 404), (path, status)
    assert b"import" not in data and b"root:" not in data


def test_assets_are_served_with_their_types_and_a_strict_policy(server) -> None:
    assert sorted(asset_table()) == ["/", "/favicon.svg", "/index.html", "/view.css", "/view.js"]
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and "default-src 'none'" in resp.getheader("Content-Security-Policy")
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere: works offline
    conn.close()
    for name, ctype in [("/view.js", "text/javascript"), ("/view.css", "text/css")]:
        status, got, data = request(server, name)
        assert status == 200 and got.startswith(ctype) and b"https://" not in data
    status, _, _ = request(server, "/api/info", method="PUT")
    assert status == 405
    status, _, _ = request(server, "/api/attend", method="POST", body=b"")
    assert status == 405


# ------------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------------
def test_view_command_serves_until_interrupted(demo_store) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_dualform", "view", demo_store, "--port", "0", "--no-browser",
                             "--cache", "64M", "--no-warm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/api/cache")
        body = json.loads(conn.getresponse().read())
        assert body["cache"]["budget"] == 64 * 2**20
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_view_command_refuses_bad_options(demo_store, capsys, tmp_path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        for argv in (["view", demo_store, "--cache", "lots"], ["view", demo_store, "--port", "70000"],
                     ["view", str(tmp_path / "nope.h5")], ["view", demo_store, "--no-browser", "--no-warm",
                                                           "--port", str(busy.getsockname()[1])]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("lightning-dualform: error: "), (argv, err)
    finally:
        busy.close()


def test_parse_cache() -> None:
    from lightning_dualform.cli.inputs import UsageError
    from lightning_dualform.cli.view import parse_cache

    assert parse_cache("auto") == "auto" and parse_cache("none") is None
    assert parse_cache("2G") == 2 * 2**30 and parse_cache("512MiB") == 512 * 2**20 and parse_cache("1000") == 1000
    with pytest.raises(UsageError):
        parse_cache("0")


# ------------------------------------------------------------------------------------------------------
# the page in a real browser
# ------------------------------------------------------------------------------------------------------
def _browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set LIGHTNING_DUALFORM_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it drives the system's Chromium)")
    return sync_playwright


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def _viewer_page(server, index: int):
    """The viewer's page for test query ``index`` in headless Chromium; console errors, page errors and requests
    outside the viewer fail the test when the block ends."""
    sync_playwright = _browser()
    url = f"http://127.0.0.1:{server.server_address[1]}/#split=test&index={index}&top_k=5"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: problems.append("outside request " + r.url) if not r.url.startswith(url[:22]) else None)
            page.goto(url)
            yield page
        finally:
            browser.close()
    assert not problems, problems


@pytest.mark.browser
def test_the_page_in_headless_chromium(server, demo_store, tmp_path) -> None:
    index = int(_test_indices(demo_store)[7])
    _, api = get_json(server, f"/api/attend?split=test&index={index}&top_k=5")
    with _viewer_page(server, index) as page:
        page.wait_for_selector(".layer[data-layer='net.4'] .ranking[data-kind='con'] .thumb canvas", timeout=60_000)
        assert page.inner_text("#query-title") == f"test #{index}"
        # the first card answers "which examples": influence on the prediction's margin, labelled
        card = ".influence-card .ranking[data-kind='influence-pro'] .thumb"
        page.wait_for_selector(f"{card} canvas", timeout=60_000)
        shown = page.eval_on_selector_all(card, "els => els.map(e => Number(e.dataset.index))")
        assert shown == [p["index"] for p in api["influence"]["queries"][0]["proponents"]]
        assert page.input_value("#method") == "first_order:output"
        assert "through layer net.4 only" in page.inner_text(".influence-card h2")
        assert page.inner_text(f"{card} .score .what").strip() == "dmargin/dw"
        first = page.eval_on_selector("#layers", "b => b.firstElementChild.className")
        assert first == "influence-card"
        # every layer's top-5 thumbnails are the API's top-5 rows of this query, drawn as images
        for name in ("net.0", "net.2", "net.4"):
            shown = page.eval_on_selector_all(f".layer[data-layer='{name}'] .ranking[data-kind='top'] .thumb",
                                              "els => els.map(e => Number(e.dataset.index))")
            assert shown == api["layers"][name]["top"]["index"][0]
            drawn = page.eval_on_selector(f".layer[data-layer='{name}'] .thumb canvas",
                                          "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                                          " let dark = 0; for (let i = 0; i < d.length; i += 4) dark += d[i] < 128; return dark; }")
            assert drawn > 10  # ink on the canvas
        pro = page.eval_on_selector_all(".layer[data-layer='net.4'] .ranking[data-kind='pro'] .thumb",
                                        "els => els.map(e => Number(e.dataset.index))")
        assert pro == [i for i in api["layers"]["net.4"]["proponents"]["index"][0] if i >= 0]
        assert page.locator(".mass-label .bars .name").count() >= 10 * 3
        assert "exact" in page.inner_text(".layer[data-layer='net.0'] .cert")
        # every number says what it is, and the controls start at the command line's defaults
        assert page.input_value("#score") == "auto" and page.input_value("#top-k") == "5"
        assert page.input_value("#contribution") == "auto"
        top = ".layer[data-layer='net.4'] .ranking[data-kind='top']"
        assert "by similarity, k·q" in page.inner_text(f"{top} h3")
        assert page.inner_text(f"{top} .thumb .score .what").strip() == "k·q"
        assert "contribution" in page.inner_text(".layer[data-layer='net.4'] .ranking[data-kind='pro'] h3")
        assert "k·q" in page.inner_text(".layer[data-layer='net.4'] .mass-step .steps-axis")
        page.select_option("#score", "unit")  # SGD's unit score: -c_s k·q for the query's unit
        page.locator(f"{top} h3", has_text="attention weight for unit").wait_for(timeout=60_000)
        assert "weight" in page.inner_text(".layer[data-layer='net.4'] .mass-label h3")
        page.select_option("#score", "auto")
        page.locator(f"{top} h3", has_text="similarity").wait_for(timeout=60_000)
        # the slider: the model after 12 steps
        page.eval_on_selector("#at-step", "s => { s.value = 12; s.dispatchEvent(new Event('input')); }")
        page.locator(".layer h2", has_text=re.compile(r"up to step 12\b")).first.wait_for(timeout=60_000)
        _, early = get_json(server, f"/api/attend?split=test&index={index}&top_k=5&at_step=12")
        shown = page.eval_on_selector_all(".layer[data-layer='net.4'] .ranking[data-kind='top'] .thumb",
                                          "els => els.map(e => Number(e.dataset.index))")
        assert shown == early["layers"]["net.4"]["top"]["index"][0]
        assert "earlier step" in page.inner_text(".layer[data-layer='net.4'] .cert")
        # one layer only, then the next query
        page.select_option("#layer", "net.4")
        page.locator(".layer[data-layer='net.0']").wait_for(state="detached", timeout=60_000)
        page.click("#next")
        nxt = int(_test_indices(demo_store)[8])
        page.locator("#query-title", has_text=re.compile(f"^test #{nxt}$")).wait_for(timeout=60_000)
        # an uploaded .npy row
        rows = np.random.default_rng(1).random((1, 784), dtype=np.float32)
        np.save(tmp_path / "mine.npy", rows)
        page.select_option("#layer", "")
        page.set_input_files("#upload", str(tmp_path / "mine.npy"))
        page.locator("#query-title", has_text=re.compile("^row 0 of mine.npy$")).wait_for(timeout=60_000)
        page.wait_for_selector(".layer[data-layer='net.0'] .thumb canvas", timeout=60_000)
        assert page.locator(".layer").count() == 1  # only net.0 takes 784 numbers
        page.screenshot(path=str(tmp_path / "view.png"), full_page=True)
        assert page.is_hidden("#error"), page.inner_text("#error")


@pytest.mark.browser
def test_the_study_panel_in_headless_chromium(server, demo_store) -> None:
    """The authors' measures panel draws what /api/study answers: one table row and one rank plot per layer."""
    index = int(_test_indices(demo_store)[3])
    _, api = get_json(server, f"/api/study?split=test&index={index}&score=signed")
    with _viewer_page(server, index) as page:
        page.wait_for_selector("#study-go", timeout=60_000)
        page.select_option("#study-score", "signed")
        page.click("#study-go")
        page.wait_for_selector(".study-table tr:nth-child(2)", timeout=60_000)
        rows = page.eval_on_selector_all(".study-table tr", "trs => trs.slice(1).map(tr => "
                                         "Array.from(tr.children).map(td => td.textContent))")
        assert [r[0] for r in rows] == list(api["layers"])
        assert [int(r[1]) for r in rows] == [m["vote"] for m in api["layers"].values()]
        dots = page.eval_on_selector_all(".rank-plot", "ss => ss.map(s => s.querySelectorAll('circle').length)")
        assert dots == [len(m["rank"]["label"]) for m in api["layers"].values()]
        hits = page.eval_on_selector_all(".rank-plot", "ss => ss.map(s => s.querySelectorAll('circle.hit').length)")
        assert hits == [sum(lab == api["label"] for lab in m["rank"]["label"]) for m in api["layers"].values()]
