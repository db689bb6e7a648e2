"""``lightning-dualform view STORE``: a local web page to explore a store, served by the process that holds
a cached :class:`~lightning_dualform.DualInference`.

The page (``view_assets/``: one HTML file, one script, one style sheet; no CDN, it works offline) picks a
recorded query or an uploaded ``.npy`` row and shows, per layer, the training examples it attends to as
images, signed contributions, mass per class and over training, the certificate, and ``at_step`` as a
slider. Images travel as pixel arrays in JSON and are drawn on canvases, so no image library is needed.

Endpoints (``GET`` unless said otherwise; every answer is JSON, every error a one-line ``{"error": ...}``):

- ``/api/info``: the store (layers, steps, epochs, certificate per layer, query sets) and the cache.
- ``/api/queries?split=S``: dataset index, label and prediction of each recorded query of a split.
- ``/api/attend?split=S&index=I&layer=L&top_k=K`` (also ``by``, ``contribution_to``, ``at_step``,
  ``step_buckets``, ``score``, or ``upload=ID`` instead of ``split``/``index``): exactly what ``lightning-dualform
  attend STORE --split S --index I --layer L --top-k K --json FILE`` writes (the same functions,
  :func:`~lightning_dualform.cli.attend.attend_run` and ``attend_answer``): ``influence`` (first order on the
  prediction's margin through the output layer, from the store alone), then the attention.
- ``/api/influence?split=S&index=I&method=M&layers=output|all&top_k=K`` (or ``upload=ID``): the examples ranked by
  influence on each prediction's margin: ``method=first_order&layers=output`` from the store alone; every
  recorded layer (``layers=all``) and ``every_step``, ``metagradient`` need the model (``view --model``).
- ``/api/images?split=S&index=I,J`` or ``/api/images?train=I,J``: raw inputs as images (``null`` when the
  input is not an image).
- ``/api/study?split=S&index=I&score=abs|signed``: the paper authors' measures of one query (``view_study.py``).
- ``POST /api/upload?name=N``: the bytes of a ``.npy`` file (read without pickle); returns an ``upload`` id.

It listens on 127.0.0.1 only, answers only requests addressed to that host or ``localhost`` (a page of
another site cannot reach it through DNS rebinding), serves no file but its own assets (looked up by name
in a table made at start, never joined to a path from a request), and rejects bad parameters with HTTP 400.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import threading
import time
from typing import Any, Callable

import numpy as np

from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.cli.attend import attend_answer, attend_run
from lightning_dualform.cli.usage import TERMINAL_TOP_K
from lightning_dualform.cli.inputs import (
    UsageError,
    check_store_path,
    error_message,
    load_npy_bytes,
    parse_contribution,
    parse_index,
    pick_split,
    positive,
)
from lightning_dualform.cli.output import note, progress
from lightning_dualform.cli.view_http import (
    DEFAULT_PORT,
    HOST,
    BadRequest,
    ViewServer,
)
from lightning_dualform.cli.which_examples import model_influence, output_rows_influence, store_influence, unavailable
from lightning_dualform.errors import StoreError

log = logging.getLogger(__name__)

#: images per /api/images request
MAX_IMAGES = 256
MAX_UPLOADS = 16
#: integers in requests are 64-bit (dataset indices, steps, counts): anything beyond is refused with 400
_INT64 = 1 << 63
#: what the answer says in place of the rankings that ``top_k=0`` asks not to compute
NOT_COMPUTED = "not computed (top_k=0)"
_RANKINGS = ("top", "top_examples", "proponents", "opponents", "proponent_examples", "opponent_examples")
_ATTEND_PARAMS = {"split", "index", "upload", "layer", "top_k", "by", "contribution_to", "at_step", "step_buckets", "score"}
_INFLUENCE_PARAMS = {"split", "index", "upload", "method", "layers", "top_k"}
#: queries per /api/influence request (a replaying method costs a reverse sweep per batch of queries)
MAX_INFLUENCE_QUERIES = 64


# ------------------------------------------------------------------------------------------------------
# the application: every answer as plain data, independent of HTTP
# ------------------------------------------------------------------------------------------------------
class ViewApp:
    """Answers the viewer's API from one open, cached :class:`~lightning_dualform.DualInference`.

    Calls into the store are serialised: one pass at a time uses both cores best, and a refresh after the
    store changed on disk must not swap the store under another request.

    Args:
        store: the store's path (as the command line got it).
        di: the open store; keep ``cache`` on so that repeated questions cost the products.
        model: the trained model (``view --model``), for influence through every layer and the replaying
            methods; None: the output layer's first-order influence only, from the store.
        model_spec: where the model came from (``MODULE:FACTORY``), for the page.
    """

    def __init__(self, store: str, di: Any, model: Any = None, model_spec: str | None = None) -> None:
        self.store_path = store
        self.di = di
        self.model = model
        self.model_spec = model_spec
        self.lock = threading.RLock()
        self._uploads: dict[str, tuple[str, np.ndarray]] = {}

    # -- helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _one(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
        values = params.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise BadRequest(f"parameter {name!r} given {len(values)} times; give it once.")
        return values[0]

    @classmethod
    def _int(cls, params: dict[str, list[str]], name: str, default: int | None, lo: int | None = None) -> int | None:
        text = cls._one(params, name)
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise BadRequest(f"{name}={text!r} is not an integer.") from None
        if not -_INT64 <= value < _INT64:
            raise BadRequest(f"{name}={text[:40]}: beyond any count or step a store holds (64-bit integers).")
        if lo is not None and value < lo:
            raise BadRequest(f"{name}={value}: expected {lo} or more.")
        return value

    @staticmethod
    def _known(params: dict[str, list[str]], allowed: set[str]) -> None:
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise BadRequest(f"unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(sorted(allowed)) or 'none'}.")

    # -- endpoints -------------------------------------------------------------------------------------
    def info(self, params: dict[str, list[str]]) -> dict[str, Any]:
        self._known(params, set())
        with self.lock:
            self.di.refresh()
            s = self.di.store
            layers = []
            for name in self.di.layers:
                lay = self.di.layer(name)
                a = lay.attrs
                layers.append({
                    "name": name, "kind": lay.kind, "d_in": lay.d_in, "d_out": lay.d_out, "rows": lay.n_rows,
                    "exact": bool(lay.exact and s.optimizer_exact),
                    "certificate": {k[len("certificate_"):]: _plain(a[k]) for k in a if k.startswith("certificate_")},
                })
            splits = []
            for split in s.query_splits:
                qs = s.queries(split, stale_ok=True)
                if qs.stale is None:  # (a stale set is another model's: `info` lists it, with why)
                    splits.append({"name": split, "n": qs.n, "layers": list(qs.layers), "inputs": qs.has_inputs})
            steps = np.asarray(s.update_steps)
            epochs = np.asarray(s.update_epochs)
            starts = [int(steps[0])] + [int(x) for x in steps[1:][np.diff(epochs) != 0]] if len(steps) else []
            cache = self.di.cache_info()
            return {
                "store": os.path.abspath(self.store_path),
                "name": os.path.basename(self.store_path),
                "status": s.status,
                "complete": bool(s.complete),
                "first_step": int(s.first_step),
                "last_step": int(s.last_step),
                "epoch_starts": starts,
                "epochs": sorted({int(e) for e in epochs.tolist()}),
                "optimizer": s.optimizer,
                "row_dtype": s.row_dtype,
                "layers": layers,
                "splits": splits,
                "train_inputs": s.train_inputs(np.array([-1])) is not None,
                "cache": None if cache is None else cache.to_dict(),
                "cache_text": None if cache is None else str(cache),
                "defaults": {"top_k": TERMINAL_TOP_K, "by": "pattern", "contribution_to": AttendRequest.contribution_to,
                             "step_buckets": AttendRequest.step_buckets, "score": AttendRequest.score},
                "form": s.form,
                "update_rule": s.update_rule,
                "influence": {"model": self.model_spec, "methods": self._methods()},
            }

    def _methods(self) -> list[dict[str, str]]:
        """The influence methods the page offers: ``{"method", "layers", "title"}``, the default first."""
        last = self.di.layers[-1] if self.di.layers else "?"
        store_only = {"method": "first_order", "layers": "output",
                      "title": f"first order, through the output layer {last} only (from the store)"}
        if self.model is None:
            return [store_only]
        return [{"method": "first_order", "layers": "all", "title": "first order, every recorded layer"},
                store_only,
                {"method": "every_step", "layers": "all", "title": "TracIn at every recorded step (replayed)"},
                {"method": "metagradient", "layers": "all", "title": "exact metagradient through training (MAGIC)"}]

    def cache(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """What the cache holds now (``null`` fields without one)."""
        self._known(params, set())
        with self.lock:
            info = self.di.cache_info()
            return {"cache": None if info is None else info.to_dict(), "cache_text": None if info is None else str(info)}

    def queries(self, params: dict[str, list[str]]) -> dict[str, Any]:
        self._known(params, {"split"})
        with self.lock:
            self.di.refresh()
            split = self._split(self._one(params, "split"))
            qs = self.di.store.queries(split)
            return {"split": split, "n": qs.n, "index": qs.index.tolist(), "label": qs.label.tolist(),
                    "prediction": qs.prediction.tolist()}

    def _split(self, split: str | None) -> str:
        return pick_split(self.di.store, split)

    def attend(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """What ``lightning-dualform attend ... --json`` writes for the same options."""
        self._known(params, _ATTEND_PARAMS)
        upload = self._one(params, "upload")
        split, index = self._one(params, "split"), self._one(params, "index")
        layer = self._one(params, "layer")
        # a parameter left out takes the command line's default (attend_run's: the AttendRequest's knobs)
        top_k = self._int(params, "top_k", TERMINAL_TOP_K)
        at_step = self._int(params, "at_step", None)
        step_buckets = self._int(params, "step_buckets", None)
        by = self._one(params, "by", "pattern")
        contribution = self._one(params, "contribution_to")
        if contribution is not None:
            parse_contribution(contribution)
        score = self._one(params, "score")  # auto | raw | unit (attend --score)
        queries, source = None, ""
        if upload is not None:
            if split is not None or index is not None:
                raise BadRequest("upload= attends an uploaded file; leave out split and index.")
            if upload not in self._uploads:
                raise BadRequest(f"upload={upload!r}: no such upload (uploads are kept while the viewer runs); upload the file again.")
            source, queries = self._uploads[upload]
        with self.lock:
            self.di.refresh()
            run = attend_run(self.di, self.store_path, split=split, index=index, queries=queries, source=source,
                             layer=[layer] if layer else None, top_k=top_k, by=by, contribution_to=contribution,
                             at_step=at_step, step_buckets=step_buckets, score=score)
            influence = store_influence(self.di, run, top_k) if top_k else unavailable(NOT_COMPUTED)
            answer = attend_answer(run, influence)
        if top_k == 0:  # no ranking was computed: say so, rather than null (which reads as "no such row")
            for res in answer["layers"].values():
                for key in _RANKINGS:
                    if res.get(key) is None:
                        res[key] = NOT_COMPUTED
        return answer

    def influence(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """The examples ranked by influence on each query's predicted margin, by the method asked for."""
        self._known(params, _INFLUENCE_PARAMS)
        method = self._one(params, "method", "first_order")
        if method not in ("first_order", "every_step", "metagradient"):
            raise BadRequest(f"method={method!r}: expected first_order, every_step or metagradient.")
        # left out: every layer where it can be answered (a model, or a replaying method), else the output layer
        layers = self._one(params, "layers", "output" if self.model is None and method == "first_order" else "all")
        if layers not in ("output", "all"):
            raise BadRequest(f"layers={layers!r}: expected output (the output layer, from the store) or all.")
        if method != "first_order" and layers == "output":
            raise BadRequest(f"method={method} replays training through every layer; ask for layers=all.")
        if layers == "all" and self.model is None:
            raise BadRequest(f"method={method} through every layer needs the model: start the viewer with "
                             "--model MODULE:FACTORY (without it: method=first_order&layers=output).")
        top_k = self._int(params, "top_k", TERMINAL_TOP_K, lo=1)
        upload = self._one(params, "upload")
        split, index = self._one(params, "split"), self._one(params, "index")
        with self.lock:
            self.di.refresh()
            s = self.di.store
            last = self.di.layers[-1]
            if upload is not None:
                if split is not None or index is not None:
                    raise BadRequest("upload= scores an uploaded file; leave out split and index.")
                if upload not in self._uploads:
                    raise BadRequest(f"upload={upload!r}: no such upload; upload the file again.")
                rows = self._uploads[upload][1][:MAX_INFLUENCE_QUERIES]
                if layers == "output":
                    if rows.shape[1] != self.di.layer(last).d_in:
                        return unavailable(f"the upload's rows have width {rows.shape[1]}, not the output layer "
                                           f"{last}'s {self.di.layer(last).d_in}")
                    return output_rows_influence(self.di, rows, top_k)
                ref = s.train_inputs(np.array([-1]))
                if ref is None or int(np.prod(ref.shape[1:])) != rows.shape[1]:
                    return unavailable("the model takes raw inputs; the upload's rows are not of their size")
                return model_influence(self.di, self.model, rows.reshape(-1, *ref.shape[1:]), method, top_k)
            split = self._split(split)
            qs = s.queries(split)
            if index is None:
                raise BadRequest("influence of a split needs index= (dataset indices, e.g. 3,17).")
            positions = parse_index(index, qs.index, split)
            if len(positions) > MAX_INFLUENCE_QUERIES:
                raise BadRequest(f"index= names {len(positions)} queries; ask for at most {MAX_INFLUENCE_QUERIES}.")
            if layers == "output":
                if last not in qs.layers:
                    return unavailable(f"the query set {split!r} has no rows at the output layer {last}")
                rows = qs.layer_rows(last, examples=positions)
                if len(rows["example"]) != len(positions):
                    return unavailable(f"the output layer {last} sees several rows per query; pass the model "
                                       "(view --model)")
                order = np.argsort(rows["example"], kind="stable")
                return output_rows_influence(self.di, np.asarray(rows["keys"])[order], top_k)
            raw = qs.inputs_at(positions)
            if raw is None:
                return unavailable(f"the query set {split!r} holds no raw inputs to run the model on")
            return model_influence(self.di, self.model, raw, method, top_k)

    def study(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """The paper authors' measures of one recorded query (:mod:`.view_study`)."""
        from lightning_dualform.cli.view_study import study_answer

        self._known(params, {"split", "index", "score"})
        score = self._one(params, "score", "abs")
        if score not in ("abs", "signed"):
            raise BadRequest(f"score={str(score)[:40]!r}: expected 'abs' (|k·q|, the authors') or 'signed' (k·q).")
        with self.lock:
            self.di.refresh()
            split = self._split(self._one(params, "split"))
            qs = self.di.store.queries(split)
            positions = parse_index(self._one(params, "index") or "", qs.index, split)
            if len(positions) != 1:
                raise BadRequest("index= names one recorded query (its dataset index).")
            return study_answer(self.di.store, qs, int(positions[0]), "signed" if score == "signed" else "abs")

    def images(self, params: dict[str, list[str]]) -> dict[str, Any]:
        """Raw inputs as ``{"h", "w", "c", "pixels"}`` (0-255, row-major, channels last) or ``None``."""
        self._known(params, {"split", "index", "train", "upload"})
        with self.lock:
            self.di.refresh()
            s = self.di.store
            if self._one(params, "train") is not None:
                if "split" in params or "index" in params or "upload" in params:
                    raise BadRequest("train= asks for training inputs; leave out split, index and upload.")
                wanted = _int_list(self._one(params, "train"), "train")
                raw = s.train_inputs(np.asarray(wanted, dtype=np.int64))
                images = [None] * len(wanted) if raw is None else [_image(x) for x in raw]
                return {"train": wanted, "images": images}
            if self._one(params, "upload") is not None:
                uid = self._one(params, "upload")
                if uid not in self._uploads:
                    raise BadRequest(f"upload={uid!r}: no such upload; upload the file again.")
                q = self._uploads[uid][1][:MAX_IMAGES]
                ref = s.train_inputs(np.array([-1]))
                shape = ref.shape[1:] if ref is not None and int(np.prod(ref.shape[1:])) == q.shape[1] else (q.shape[1],)
                return {"upload": uid, "images": [_image(x.reshape(shape)) for x in q]}
            split = self._split(self._one(params, "split"))
            qs = s.queries(split)
            text = self._one(params, "index")
            if text is None:
                raise BadRequest("images of a split need index= (dataset indices, e.g. 3,17).")
            positions = parse_index(text, qs.index, split)
            if len(positions) > MAX_IMAGES:
                raise BadRequest(f"index= names {len(positions)} queries; ask for at most {MAX_IMAGES} at a time.")
            raw = qs.inputs_at(positions)
            images = [None] * len(positions) if raw is None else [_image(x) for x in raw]
            return {"split": split, "index": qs.index[positions].tolist(), "images": images}

    def upload(self, params: dict[str, list[str]], body: bytes) -> dict[str, Any]:
        self._known(params, {"name"})
        name = self._one(params, "name", "upload.npy") or "upload.npy"
        if not re.fullmatch(r"[\w .()+-]{1,120}", name):
            raise BadRequest("name= may hold letters, digits, spaces and . ( ) + - only (at most 120).")
        q = load_npy_bytes(body, name)
        with self.lock:
            widths = {n: self.di.layer(n).d_in for n in self.di.layers}
        takes = [n for n, w in widths.items() if w == q.shape[1]]
        if not takes:
            raise BadRequest(f"{name}: rows of width {q.shape[1]}, but no layer takes that width "
                             f"({', '.join(f'{n} takes {w}' for n, w in widths.items())}).")
        uid = secrets.token_hex(8)
        if len(self._uploads) >= MAX_UPLOADS:
            self._uploads.pop(next(iter(self._uploads)))
        self._uploads[uid] = (name, q)
        return {"upload": uid, "name": name, "n": int(q.shape[0]), "d": int(q.shape[1]), "layers": takes}

    def warm(self, note: Callable[[str], None] | None = None, bars: bool = False) -> None:
        """Read every layer into the cache once (a pass of one zero query), so that first questions are fast.

        Args:
            note: hears what is being read, and when it is done (the command prints it on stderr).
            bars: show each layer's pass as a progress bar (:class:`~lightning_dualform.DualInference`'s own).
        """
        import torch

        say = note or (lambda message: None)
        with self.lock:
            sizes = {name: self.di.layer(name).n_rows for name in self.di.layers}
        say(f"warming the cache: {len(sizes)} layer(s), {sum(sizes.values()):,} rows (questions answered meanwhile)")
        t0 = time.perf_counter()
        for name, rows in sizes.items():
            if not rows:
                continue
            with self.lock:
                shown, self.di.progress = self.di.progress, bars
                try:
                    lay = self.di.layer(name)
                    self.di.attend(name, torch.zeros(1, lay.d_in), top_k=0, per_example=False, mass=False)
                except Exception as err:  # a warm-up failure shows again, with its reason, when asked
                    log.info("warm-up of %s failed: %s", name, err)
                    say(f"warming stopped at {name}: {error_message(err)}")
                    return
                finally:
                    self.di.progress = shown
            if not bars:
                say(f"  {name}: {rows:,} rows read ({time.perf_counter() - t0:.1f} s)")
        say(f"cache warm in {time.perf_counter() - t0:.1f} s: answers now cost the products")


class _Opening:
    """Stands in for the :class:`ViewApp` while the store opens, so that the address is printed at once (a cold
    open loads torch and checks the file's structure: seconds). The page loads meanwhile; each of its questions
    waits for the open, then goes to the app, or fails with the reason the open failed."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._app: ViewApp | None = None
        self._error = "the viewer is stopping"

    def ready(self, app: ViewApp) -> None:
        self._app = app
        self._done.set()

    def failed(self, err: BaseException) -> None:
        if not self._done.is_set():
            self._error = error_message(err)
            self._done.set()

    def __getattr__(self, name: str) -> Callable[..., Any]:  # app.info, app.attend, app.upload, ...
        def call(*args: Any, **kwargs: Any) -> Any:
            self._done.wait()
            if self._app is None:
                raise StoreError(f"the store did not open: {self._error}")
            return getattr(self._app, name)(*args, **kwargs)

        return call


def _int_list(text: str | None, name: str) -> list[int]:
    try:
        values = [int(t) for t in (text or "").split(",") if t.strip()]
    except ValueError:
        raise BadRequest(f"{name}={text!r}: expected comma-separated integers.") from None
    big = next((v for v in values if not -_INT64 <= v < _INT64), None)
    if big is not None:
        raise BadRequest(f"{name}={str(big)[:40]}: beyond any dataset index (64-bit integers).")
    if not values:
        raise BadRequest(f"{name}= names nothing; expected comma-separated integers.")
    if len(values) > MAX_IMAGES:
        raise BadRequest(f"{name}= names {len(values)} inputs; ask for at most {MAX_IMAGES} at a time.")
    return values


def _image(x: np.ndarray) -> dict[str, Any] | None:
    """A raw input as 8-bit pixels, scaled from its own minimum to maximum; None when it is not an image."""
    from lightning_dualform.plots import as_image

    img = as_image(x)
    if img is None or not np.isfinite(img).all():
        return None
    lo, hi = float(img.min()), float(img.max())
    pix = np.zeros(img.shape, np.uint8) if hi <= lo else np.round((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return {"h": int(img.shape[0]), "w": int(img.shape[1]), "c": 1 if img.ndim == 2 else int(img.shape[2]),
            "pixels": pix.reshape(-1).tolist()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def serve(store: str, *, port: int = DEFAULT_PORT, device: str = "cpu", cache: int | str = "auto",
          block_rows: int | None = None, open_browser: bool = True, warm: bool = True,
          echo: Callable[[str], None] = print, note: Callable[[str], None] | None = None, bars: bool = False,
          model: str | None = None) -> int:
    """Serve the page on ``store`` until Ctrl-C, then close. Returns 0.

    ``model`` (``MODULE:FACTORY``, as ``influence --model``) adds influence through every layer and the replaying
    methods to the page's method selector.

    The address is printed (``echo``) as soon as the port is bound; the store opens after that (``note`` says so,
    and how long it took), the browser opens once it can answer, and the cache warms with progress (``bars``).
    """
    say = note or (lambda message: None)
    pending = _Opening()
    try:
        server = ViewServer(pending, port)  # type: ignore[arg-type]  # the app's stand-in until the store is open
    except OSError as err:
        raise UsageError(f"--port {port}: cannot listen on {HOST}:{port} ({err.strerror or err}); "
                         "choose another port, or --port 0 for any free one.") from None
    with server:
        echo(f"serving {store} at {server.url} (Ctrl-C to stop)")
        thread = threading.Thread(target=server.serve_forever, name="dualform-view", daemon=True)
        thread.start()
        try:
            say(f"opening {store} ...")
            t0 = time.perf_counter()
            from lightning_dualform.attend.inference import DualInference

            with DualInference(store, device=device, cache=cache, block_rows=block_rows) as di:
                net = None
                if model is not None:
                    from lightning_dualform.cli.influence import load_final_weights, load_model

                    net = load_model(model)
                    load_final_weights(net, di.store)
                app = ViewApp(store, di, net, model)
                pending.ready(app)
                say(f"open in {time.perf_counter() - t0:.1f} s")
                if open_browser:
                    import webbrowser

                    threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
                if warm:
                    app.warm(note=say, bars=bars)
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:
            echo("stopped")
        except BaseException as err:  # the store did not open: questions waiting on it get the reason
            pending.failed(err)
            raise
        finally:
            pending.failed(RuntimeError("the viewer is stopping"))
            server.shutdown()
    return 0


#: --cache sizes: a number and an optional binary unit (2G, 512MiB, 1000)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_cache(text: str) -> int | str | None:
    """``--cache``: ``'auto'``, ``'none'`` (None), or a size in bytes with an optional K/M/G/T (binary) unit."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    m = _SIZE.fullmatch(t)
    if m is None:
        raise UsageError(f"--cache {text}: expected auto, none, or a size such as 2G, 512M or 1000000.")
    value = float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b")
    if not value < 2.0**62:  # (400 digits are inf as a float)
        raise UsageError(f"--cache {text}: larger than any machine's memory; give a size such as 2G, or auto.")
    size = int(value)
    if size < 1:
        raise UsageError(f"--cache {text}: the size must be at least one byte (or none).")
    return size


def cmd_view(args: argparse.Namespace) -> int:
    """``lightning-dualform view``: check the options, then :func:`serve`."""
    check_store_path(args.store)
    positive(args.block_rows, "--block-rows")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535.")
    cache = parse_cache(args.cache)
    if args.model is not None and ":" not in args.model:
        raise UsageError(f"--model {args.model}: expected MODULE:FACTORY, e.g. mypkg.models:make_mlp.")
    return serve(args.store, port=args.port, device=args.device, cache=cache, block_rows=args.block_rows,
                 open_browser=not args.no_browser, warm=not args.no_warm, model=args.model,
                 echo=lambda m: print(m, flush=True), note=lambda m: note(args, m), bars=progress(args))
