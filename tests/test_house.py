"""The rooms' rules (``docs/development.md``), read from the source by ``tests/house.py``: every module has a room,
no room imports one above it or beside it, no cycle among rooms, and no room imports the third-party packages
it must not know (``record/`` never touches h5py; ``store/`` never imports torch or Lightning)."""

from __future__ import annotations

import house


def test_every_module_has_a_room():
    for module in house.modules():
        assert house.room(module) in house.LEVELS


def test_no_room_imports_one_above_or_beside_it():
    up = house.upward()
    assert not up, "\n".join(f"{i.source}:{i.line} imports {i.target} ({house.room(i.source)} -> "
                             f"{house.room(i.target)}, {i.kind})" for i in up)


def test_no_cycle_among_rooms():
    assert house.room_cycles() == []


def test_the_known_exceptions_are_still_there():
    """Each import of ``KNOWN_UPWARD`` still exists (fixed: strike it from the list, and the rule holds again)."""
    found = {(i.source, i.target) for i in house.upward(known=True)}
    assert set(house.KNOWN_UPWARD) <= found, set(house.KNOWN_UPWARD) - found


def test_no_room_imports_what_it_must_not_know():
    bad = house.forbidden()
    assert not bad, "\n".join(f"{i.source}:{i.line} imports {i.target}" for i in bad)


def test_the_checks_see_a_violation(tmp_path):
    """The checks can fail: a record/ module that imports h5py and the read side, in a function, is caught."""
    path = tmp_path / "planted.py"
    path.write_text("import numpy\n\n\ndef f():\n    import h5py\n"
                    "    from lightning_dualform.attend import inference\n")
    found = list(house.imports("record.planted", str(path), house.modules()))
    assert [(i.target, i.kind) for i in house.forbidden(found)] == [("h5py", "function")]
    assert [(i.target, i.kind) for i in house.upward(found)] == [("attend.inference", "function")]
    back = house.Import("attend.x", "record.engine", 1, "module", True)
    assert house.room_cycles(found + [back]) == [["attend", "record"]]
