"""What every opened store offers beyond its files (a single store or a sharded run's merged view)."""

from __future__ import annotations

from typing import Any

from lightning_dualform.optim import UpdateRule
from lightning_dualform.store.format import rule_named, store_form


class StoreView:
    """What every opened store offers beyond its files: layers by name, the step range, status.

    Subclasses set ``path``, ``status``, ``n_steps``, ``first_step``, ``update_rule``, ``optimizer_exact`` and
    ``_layers`` (name -> layer reader).
    """

    path: str
    status: str
    n_steps: int
    first_step: int
    update_rule: str
    optimizer_exact: bool
    _layers: dict[str, Any]

    @property
    def rule(self) -> UpdateRule | None:
        """The optimizer's update rule (``None`` for a ``"plain"`` store)."""
        return rule_named(self.update_rule)

    @property
    def form(self) -> str:
        """How layers are rebuilt (:data:`~lightning_dualform.store.format.FORMS`): ``"scalar"`` (SGD, ASGD:
        per-step coefficients),
        ``"element-wise"`` (Adam, AdamW, Adagrad, ...: a replay of the optimizer) or ``"plain"`` (a run
        recorded with ``exact=False``: ``p_0 - sum lr_s g_s`` plus the stored residual)."""
        return store_form(self.update_rule, self.optimizer_exact)

    @property
    def layers(self) -> list[str]:
        """Tracked layer names, in model order."""
        return list(self._layers)

    @property
    def last_step(self) -> int:
        """The model after this many optimizer steps is the latest the store can rebuild."""
        return self.first_step + self.n_steps

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def layer(self, name: str) -> Any:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; this store has {self.layers}") from None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
