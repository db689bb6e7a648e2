"""The passes of ``attend``: one interface (:class:`~.base.AttendPass`), one implementation per kind of memory.

=====================================  ===============================================================
pass                                   answers
=====================================  ===============================================================
:class:`~.scalar.ScalarPass`           SGD and the scalar rules (``StoreReader.form`` "scalar", "plain")
:class:`~.elementwise.ElementwisePass` Adam, AdamW, Adagrad, RMSprop, ... ("element-wise")
=====================================  ===============================================================
"""

from __future__ import annotations

from lightning_dualform.attend.passes.base import AttendPass, PassContext, rows_per_block
from lightning_dualform.attend.passes.elementwise import ElementwisePass
from lightning_dualform.attend.passes.scalar import ScalarPass

#: the pass that answers each store form, in the order they are tried
PASSES: tuple[type[AttendPass], ...] = (ScalarPass, ElementwisePass)

__all__ = ["AttendPass", "ElementwisePass", "PASSES", "PassContext", "ScalarPass", "pass_for", "rows_per_block"]


def pass_for(form: str) -> type[AttendPass]:
    """The pass class for a store of ``form`` (``StoreReader.form``).

    Raises:
        ValueError: a form no pass answers (a newer store).
    """
    for cls in PASSES:
        if form in cls.forms:
            return cls
    known = sorted(f for cls in PASSES for f in cls.forms)
    raise ValueError(f"no attend pass answers a store of form {form!r} (known: {known}); a newer library may read it.")
