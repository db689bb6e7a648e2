"""Rebuild one layer of a lightning-dualform store with h5py and numpy alone (see docs/store-format.md).

usage: python docs/rebuild_layer.py STORE LAYER [AT_STEP]

Prints the relative error of the rebuilt weight and bias against ``weight_final``/``bias_final`` (at the end)
and writes nothing. Convolutions of format 3 are stored as input maps: :class:`Maps` unfolds them. It covers
the update rules ``"sgd"`` (``torch.optim.SGD``; format 1 and 2 stores) and
``"adam"`` (``torch.optim.Adam`` and ``AdamW`` with every flag); the other rules replay the same way with the
per-step maths of docs/dual-form.md (``lightning_dualform/optim/`` holds all of them, in numpy). A store of a
DDP run is several files whose rows are summed step by step: this script reads one file.
"""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np


def text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Maps:
    """A convolution stored as input maps (format 3, layer attribute ``layout = "maps"``): ``keys`` holds each
    (example, call)'s unpadded input map as ``P`` channel-last pixel rows, ``values`` one row per output location
    (``L`` per map), the metadata columns one entry per map. Virtual row ``r`` is location ``r % L`` of map ``r // L``."""

    def __init__(self, g: h5py.Group) -> None:
        a = {k: json.loads(text(g.attrs[k])) for k in ("kernel_size", "stride", "dilation", "padding")}
        self.kernel, self.stride, self.dilation = a["kernel_size"], a["stride"], a["dilation"]
        self.size = [int(v) for v in g["input_size"][()]]
        dims = len(self.size)
        pad = a["padding"]  # F.pad order: last dimension first
        self.pad = [(0, 0), (0, 0)] + [(pad[2 * (dims - 1 - i)], pad[2 * (dims - 1 - i) + 1]) for i in range(dims)]
        self.mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[text(g.attrs["padding_mode"])]
        padded = [n + lo + hi for n, (lo, hi) in zip(self.size, self.pad[2:])]
        self.out = [(p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(padded, self.kernel, self.stride, self.dilation)]
        self.pixels, self.locations = int(np.prod(self.size)), int(np.prod(self.out))

    def keys(self, pixels: np.ndarray) -> np.ndarray:
        """Pixel rows ``(E * P, C)`` -> key rows ``(E * L, C * prod(kernel))`` (``F.unfold``'s order)."""
        dims, c = len(self.size), pixels.shape[1]
        x = np.moveaxis(pixels.reshape(-1, *self.size, c), -1, 1)  # (E, C, *size)
        x = np.pad(x, self.pad, mode=self.mode)
        span = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation)]
        w = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + dims)))
        w = w[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride), *(slice(None, None, d) for d in self.dilation))]
        w = w[(slice(None), slice(None), *(slice(0, o) for o in self.out))]  # (E, C, *out, *kernel)
        w = w.transpose(0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))  # (E, *out, C, *kernel)
        return w.reshape(-1, c * int(np.prod(self.kernel)))


def step_gradients(f: h5py.File, g: h5py.Group, stop: int):
    """``(s, G_w, g_b)`` for update numbers ``0..stop-1``: ``G = sum over the step's rows of values^T keys``."""
    n = int(g["committed_rows"][0])
    first = int(f["update_step"][0])
    maps = Maps(g) if text(g.attrs.get("layout", "rows")) == "maps" else None
    per = maps.locations if maps else 1  # virtual rows per entry of the step column
    steps = np.repeat(g["step"][: n // per] - first, per)
    keys, values = g["keys"], g["values"]
    bf16 = text(f.attrs["row_dtype"]) == "bfloat16"
    cuts = np.searchsorted(steps, np.arange(stop + 1))  # (a step's rows are whole maps)
    for s in range(stop):
        a, b = int(cuts[s]), int(cuts[s + 1])
        k = keys[a // per * maps.pixels : b // per * maps.pixels] if maps else keys[a:b]
        v = values[a:b]
        if bf16:  # stored as the upper 16 bits of a float32
            k, v = ((x.astype(np.uint32) << 16).view(np.float32) for x in (k, v))
        if maps:
            k = maps.keys(k)
        if text(g.attrs["kind"]) == "embedding":  # token ids -> one-hot keys
            k = np.eye(int(g.attrs["d_in"]))[k[:, 0]]
        v = v.astype(np.float64)
        yield s, v.T @ k.astype(np.float64), v.sum(0)


def sgd_step(p, buf, g, hp):
    """torch.optim.SGD, one parameter (docs/store-format.md)."""
    d = (-g if hp["maximize"] else g) + hp["weight_decay"] * p
    if hp["momentum"] != 0:
        buf = d.copy() if hp["fresh_buffer"] else hp["momentum"] * buf + (1 - hp["dampening"]) * d
        d = d + hp["momentum"] * buf if hp["nesterov"] else buf
    return p - hp["lr"] * d, buf


def adam_step(p, st, g, hp):
    """torch.optim.Adam / AdamW, one parameter: ``st`` holds step, exp_avg, exp_avg_sq (and max_exp_avg_sq)."""
    if hp["maximize"]:
        g = -g
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    st["step"] += 1
    if wd != 0:
        if hp["decoupled_weight_decay"]:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    st["exp_avg"] = st["exp_avg"] + (1 - b1) * (g - st["exp_avg"])  # torch's lerp
    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
    v = st["exp_avg_sq"]
    if hp["amsgrad"]:
        st["max_exp_avg_sq"] = np.maximum(st.get("max_exp_avg_sq", np.zeros_like(v)), v)
        v = st["max_exp_avg_sq"]
    bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
    return p - (lr / bc1) * st["exp_avg"] / (np.sqrt(v) / np.sqrt(bc2) + eps)


def rebuild(path: str, layer: str, at_step: int | None = None):
    """The layer's weight ``(d_out, d_in)`` and bias after ``at_step`` optimizer steps (default: the end)."""
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        g = f["layers"][layer]
        rule = text(f.attrs.get("update_rule", "sgd"))  # format 1 stores are SGD
        if rule not in ("sgd", "adam") or not f.attrs["optimizer_exact"]:
            raise SystemExit(f"this script rebuilds 'sgd' and 'adam' stores of exact runs, not {rule!r}")
        S = int(f["committed_steps"][0])
        stop = S if at_step is None else at_step - int(f["update_step"][0])
        kind = text(g.attrs["kind"])
        d_out, d_in = int(g.attrs["d_out"]), int(g.attrs["d_in"])

        def view(a):  # the optimizer's state is in the parameter's shape; keys multiply the (d_out, d_in) view
            return a.T if kind == "embedding" else a.reshape(d_out, d_in)

        params = {"weight": g["weight_init"][()].astype(np.float64)}
        if "bias_init" in g:
            params["bias"] = g["bias_init"][()].astype(np.float64)
        state = {}
        for name in params:
            if rule == "sgd":
                buf = g.get(f"{name}_buffer_init")
                state[name] = None if buf is None else buf[()].astype(np.float64)
            else:
                sg = g["state"][name]
                st = {k: np.asarray(sg[k][()], dtype=np.float64) for k in sg}
                st = {k: view(v) if name == "weight" else v for k, v in st.items()}
                st["step"] = float(sg.attrs["step"])
                state[name] = st
        table = {name: {c: g["updates"][name][c][:S] for c in g["updates"][name]} for name in params}
        scale = g["updates"]["grad_scale"][:S]
        for s, G, gb in step_gradients(f, g, stop):
            for name, grad in (("weight", G), ("bias", gb)):
                if name not in params:
                    continue
                hp = {c: col[s].item() for c, col in table[name].items()}
                if not hp["applied"]:
                    continue
                if rule == "sgd":
                    params[name], state[name] = sgd_step(params[name], state[name], scale[s] * grad, hp)
                else:
                    params[name] = adam_step(params[name], state[name], scale[s] * grad, hp)
        return params["weight"], params.get("bias")


def main() -> None:
    path, layer = sys.argv[1], sys.argv[2]
    at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    w, b = rebuild(path, layer, at)
    if at is None:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            g = f["layers"][layer]
            wf = g["weight_final"][()].astype(np.float64)
            print(f"weight: relative error {np.linalg.norm(w - wf) / np.linalg.norm(wf):.2e}")
            if b is not None:
                bf = g["bias_final"][()].astype(np.float64)
                print(f"bias:   relative error {np.linalg.norm(b - bf) / np.linalg.norm(bf):.2e}")
    else:
        print(f"rebuilt {layer} after step {at}: weight {w.shape}, |W| = {np.linalg.norm(w):.6g}")


if __name__ == "__main__":
    main()
