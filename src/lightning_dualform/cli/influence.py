"""``lightning-dualform influence``: which training examples each recorded query depends on, counterfactually.

The store holds the tracked layers' weights but not the model's code, so the command imports the model from
``--model module:factory`` (a function of no arguments that returns the untrained ``nn.Module``; the store's final
weights are then loaded into its tracked layers) and scores every training example by
:func:`lightning_dualform.attribute.influence` for the recorded queries of a split. Without ``--model`` it scores
them from the store alone, to first order through the output layer only
(:func:`~lightning_dualform.attribute.output_layer.output_layer_influence`): the output layer's ``df/dy`` needs
only the logits, a hidden layer's needs the layers above it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from lightning_dualform._unwrap import named_modules
from lightning_dualform.cli.inputs import check_store_path, parse_index, pick_split
from lightning_dualform.cli.usage import UsageError
from lightning_dualform.cli.output import JSON_SUFFIXES, Inputs, Output, json_text, note, table, write_together

if TYPE_CHECKING:
    from lightning_dualform.attribute.targets import TargetName

DEFAULT_QUERIES = 3


def load_model(spec: str) -> nn.Module:
    """The model ``module:factory()`` builds."""
    if ":" not in spec:
        raise UsageError(f"--model {spec}: expected MODULE:FACTORY, e.g. mypkg.models:make_mlp.")
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"--model {spec}: cannot import it ({err}).") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec}: returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def load_final_weights(model: nn.Module, store: Any) -> None:
    """Put the store's final weights into the model's tracked layers."""
    modules = named_modules(model)
    for name in store.layers:
        if name not in modules:
            raise UsageError(f"--model: the model has no module {name!r}; the store tracks {store.layers}.")
        lay, mod = store.layer(name), modules[name]
        if lay.weight_final is None:
            raise UsageError(f"{store.path}: layer {name!r} has no final weights (an unfinished store).")
        w = torch.as_tensor(lay.to_param(lay.weight_final))
        with torch.no_grad():
            mod.weight.copy_(w.reshape(mod.weight.shape))
            if lay.has_bias:
                mod.bias.copy_(torch.as_tensor(lay.bias_final))


def cmd_influence(args: argparse.Namespace) -> int:
    check_store_path(args.store)
    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: expected 1 or more.")
    if args.model is None and args.method != "first_order":
        raise UsageError(f"--method {args.method} replays training through every layer: it needs --model "
                         "MODULE:FACTORY (without a model: --method first_order, through the output layer only).")
    keep = Inputs(args.store)
    outputs = [Output(args.json, "--json", JSON_SUFFIXES, keep)]
    try:
        outputs.append(Output(args.scores, "--scores", (".npy",), keep))
        outputs.append(_companion(args.scores, keep))
        _run(args, *outputs)
    finally:
        for out in outputs:
            out.discard()
    return 0


def companion_path(scores: str) -> str:
    """``FILE.examples.npy``, beside ``--scores FILE.npy``: the dataset index of each column."""
    return os.path.splitext(scores)[0] + ".examples.npy"


def _companion(scores: str | None, keep: Inputs) -> Output:
    """The output of ``--scores``' companion, checked and opened as the main one is."""
    if scores is None:
        return Output(None, "--scores")
    path = companion_path(scores)
    try:
        return Output(path, f"--scores {scores}: its companion", (".npy",), keep)
    except UsageError as err:  # (the same reason, with the fix that applies: its name follows --scores')
        reason = str(err).rsplit("; ", 1)[0]
        raise UsageError(f"{reason}; choose another --scores name (FILE.npy writes each column's dataset index to "
                         "FILE.examples.npy beside it).") from None


def _run(args: argparse.Namespace, json_out: Output, scores_out: Output, examples_out: Output) -> None:
    from lightning_dualform.attribute import influence
    from lightning_dualform.attribute.views import TARGET_MEANING, influence_label, influence_meaning
    from lightning_dualform.store.shards import open_store

    model = load_model(args.model) if args.model is not None else None
    with open_store(args.store) as store:
        all_layers = list(store.layers)
        if model is not None:
            load_final_weights(model, store)
        split = pick_split(store, args.split)
        qs = store.queries(split)
        if args.index is not None:
            positions = parse_index(args.index, qs.index, split)
        else:
            positions = np.arange(min(DEFAULT_QUERIES, qs.n))
        labels = qs.label[positions]
        if model is None:
            res, pred = _store_only(store, qs, split, positions, labels, args.target)
            targets = np.asarray(res.extra["targets"])
        else:
            inputs = qs.inputs_at(positions)
            if inputs is None:
                raise UsageError(f"query set {split!r} of {store.path} has no raw inputs to run the model on.")
            x = torch.as_tensor(inputs).float()
            with torch.no_grad():
                pred = model(x).argmax(-1).numpy()
            targets = np.where(labels >= 0, labels, pred)
            res = influence(store, model, x, torch.as_tensor(targets), target=args.target, method=args.method)
    pro, opp = res.top(args.top_k)
    col = f"d{res.target}/dw"
    lines = [f"{influence_label(res, all_layers)}; {len(res.examples)} training examples; {res.seconds:.2f} s",
             f"  {res.target}: {TARGET_MEANING[res.target]} (the class: the recorded label, else the prediction)"]
    if model is None and len(all_layers) > 1:
        lines.append("  (from the store alone; --model MODULE:FACTORY adds the hidden layers, and --method every_step "
                     "or metagradient)")
    if res.replay is not None:
        lines.append(f"replay: gradients within {res.replay.grad_error:.1e} of the stored ones, final weights within "
                     f"{res.replay.max_final_error:.1e}")
    for j, p in enumerate(positions):
        lines.append(f"\nquery {int(qs.index[p])} (class {int(targets[j])}, predicted {int(pred[j])}): "
                     f"{res.target} = {float(res.values[j]):.4g}")
        # fewer examples than --top-k push one way: the padding (index -1) is left blank, as `attend` does
        rows = [[r + 1, *_cells(pro, j, r), *_cells(opp, j, r)] for r in range(pro.index.shape[1])
                if pro.index[j, r] >= 0 or opp.index[j, r] >= 0]
        if rows:
            lines.append(table(["rank", "proponent", "label", col, "opponent", "label", col], rows))
        else:
            lines.append(f"  every {col} is 0: no training example moves this query's {res.target}")
    print("\n".join(lines))
    text = ""
    if args.json:
        data = res.to_dict(args.top_k)
        for side in ("proponents", "opponents"):  # per query, only the examples that push that way
            data[side] = _without_padding(data[side])
        data.update({"store": os.path.abspath(args.store), "split": split, "queries": qs.index[positions].tolist(),
                     "targets": targets.tolist(), "label": influence_label(res, all_layers),
                     "meaning": influence_meaning(res, all_layers),
                     "scope": res.extra.get("scope", "all layers")})
        text = json_text(data)
    write_together((json_out, text), (scores_out, lambda path: np.save(path, res.scores.numpy())),
                   (examples_out, lambda path: np.save(path, res.examples)))
    for out in (json_out, scores_out, examples_out):
        if out.path:
            note(args, f"wrote {out.path}")


def _cells(top: Any, j: int, r: int) -> list[Any]:
    """Query ``j``'s ``r``-th proponent or opponent as table cells, blank where there is none (index -1)."""
    if top.index[j, r] < 0:
        return ["", "", ""]
    return [int(top.index[j, r]), int(top.label[j, r]), f"{top.score[j, r]:+.4g}"]


def _without_padding(side: dict[str, list[list[Any]]]) -> dict[str, list[list[Any]]]:
    """``TopInfluence.to_dict()`` without the padding entries (index -1): a list per query, up to --top-k long."""
    keep = [[i >= 0 for i in row] for row in side["index"]]
    return {key: [[v for v, k in zip(row, ks) if k] for row, ks in zip(rows, keep)] for key, rows in side.items()}


def _store_only(store: Any, qs: Any, split: str, positions: np.ndarray, labels: np.ndarray,
                target: "TargetName") -> tuple[Any, np.ndarray]:
    """First-order influence through the output layer from the store alone: the recorded query rows of the last
    tracked layer, its stored final weights, each query's recorded label (else the prediction)."""
    from lightning_dualform.attribute.output_layer import output_layer_influence

    last = store.layers[-1]
    if last not in qs.layers:
        raise UsageError(f"query set {split!r} has no rows at the output layer {last}; pass --model MODULE:FACTORY.")
    rows = qs.layer_rows(last, examples=positions)
    if len(rows["example"]) != len(positions):
        raise UsageError(f"the output layer {last} sees several rows per query (a sequence or a convolution); pass "
                         "--model MODULE:FACTORY.")
    keys = np.asarray(rows["keys"])[np.argsort(rows["example"], kind="stable")]
    w, b = store.layer(last).weight_final, store.layer(last).bias_final
    if w is None:
        raise UsageError(f"{store.path}: layer {last!r} has no final weights (an unfinished store); use `attend`, "
                         "whose influence takes the dual form's outputs.")
    logits = keys.astype(np.float64) @ np.asarray(w, dtype=np.float64).T + (0 if b is None else np.asarray(b))
    pred = logits.argmax(-1)
    targets = np.where(labels >= 0, labels, pred)
    res = output_layer_influence(store, keys, layer=last, targets=targets, target=target)
    return res, pred
