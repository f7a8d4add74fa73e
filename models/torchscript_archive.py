"""The parameters and buffers of a TorchScript archive, read without running any of its code.

OpenAI's CLIP release (`ViT-L-14.pt`, which Karlo uses) is a TorchScript archive. `torch.jit.load`
executes the archive's compiled code while loading it (a class's `__setstate__` runs), so a crafted
file placed under a Karlo file name runs code; `torch.load(weights_only=True)` refuses such archives
outright. This module reads the archive as data instead: `data.pkl` goes through an unpickler that
knows only tensors and plain containers and turns every scripted object into an inert record, the
tensor bytes come from the zip's `data/` entries, and the class declarations in `code/` are read as
text (never executed) for which attributes are parameters and buffers — the same names
`torch.jit.load(...).state_dict()` gives. An archive whose classes define `__setstate__` is refused:
its weights are only what that code makes of them, so it needs the caller's explicit trust.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

_CLASS_LINE = re.compile(r"^class (\w+)\(")
_LIST_LINE = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")
_SETSTATE_LINE = re.compile(r"^\s+def __setstate__\(")
_STORAGE_TYPES = {
    name: getattr(torch, name)
    for name in ("FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                 "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage")
}


class ArchiveRefused(ValueError):
    """A TorchScript archive that cannot be read as plain data, with the reason."""


@dataclass
class ClassDecl:
    """What a scripted class's source declares: its parameter and buffer names, and whether it has
    a `__setstate__` (code that would run on load)."""

    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    has_setstate: bool = False


class ScriptedObject:
    """An inert stand-in for an instance of a scripted class: it keeps the pickled state and runs
    nothing (pickle's BUILD calls this `__setstate__`, never the archive's)."""

    qualified_name = "?"

    def __init__(self, *args) -> None:
        self.state = None

    def __setstate__(self, state) -> None:
        self.state = state


def is_torchscript(path: str | Path) -> bool:
    """True when `path` is a zip archive carrying compiled TorchScript code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


def _class_declarations(zf: zipfile.ZipFile, root: str) -> dict[str, ClassDecl]:
    """`__torch__.…Name` → its declarations, parsed from the archive's `code/` sources as text."""
    decls: dict[str, ClassDecl] = {}
    prefix = f"{root}/code/"
    for name in zf.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix) : -len(".py")].replace("/", ".")
        current: ClassDecl | None = None
        for line in zf.read(name).decode("utf-8", errors="replace").splitlines():
            if m := _CLASS_LINE.match(line):
                current = decls.setdefault(f"{module}.{m.group(1)}", ClassDecl())
            elif current is not None and (m := _LIST_LINE.match(line)):
                names = [n.strip().strip('"') for n in m.group(2).split(",") if n.strip()]
                getattr(current, m.group(1)).extend(names)
            elif current is not None and _SETSTATE_LINE.match(line):
                current.has_setstate = True
    return decls


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.zf, self.root, self.path = zf, root, path
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (ScriptedObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise ArchiveRefused(f"{self.path}: its data refers to {module}.{name}, which a weights file never needs; "
                             "refused (loading it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveRefused(f"{self.path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype
        raw = bytearray(self.zf.read(f"{self.root}/data/{key}"))
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * itemsize:
            raise ArchiveRefused(f"{self.path}: tensor data {key} holds {len(raw)} bytes, {numel * itemsize} expected "
                                 "(the file is truncated or damaged)")
        untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _walk(obj: ScriptedObject, decls: dict[str, ClassDecl], prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.state
    if not isinstance(state, dict):
        return
    decl = decls.get(obj.qualified_name)
    kept = None if decl is None else set(decl.parameters) | set(decl.buffers)
    for key, value in state.items():
        if isinstance(value, ScriptedObject):
            _walk(value, decls, f"{prefix}{key}.", out)
        elif isinstance(value, torch.Tensor) and (kept is None or key in kept):
            out[prefix + key] = value


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict `torch.jit.load(path).state_dict()` would give, read without executing anything.

    :raises ArchiveRefused: the archive's classes define `__setstate__`, or its data refers to anything
        but tensors, plain containers and scripted objects, or its tensor data is incomplete.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveRefused(f"{path}: not a readable TorchScript archive ({exc})") from exc
    with zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise ArchiveRefused(f"{path}: no data.pkl at the archive's top level")
        root = pickles[0].split("/")[0]
        decls = _class_declarations(zf, root)
        with_code = sorted(name for name, decl in decls.items() if decl.has_setstate)
        if with_code:
            raise ArchiveRefused(f"{path}: refused because loading it would run the archive's own code "
                                 f"(__setstate__ of {', '.join(with_code)}); only for a file from a source you "
                                 "trust, load it with trust_pickle=True (CLI: --trust-pickle)")
        try:
            with warnings.catch_warnings():  # torch's tensor rebuild takes the TypedStorage it deprecates
                warnings.simplefilter("ignore", UserWarning)
                top = _DataOnlyUnpickler(zf.read(pickles[0]), zf, root, path).load()
        except ArchiveRefused:
            raise
        except Exception as exc:  # truncated pickles, bad zip members, wrong argument types
            raise ArchiveRefused(f"{path}: cannot read its data ({type(exc).__name__}: {exc}); the file is "
                                 "truncated or damaged") from exc
    if not isinstance(top, ScriptedObject):
        raise ArchiveRefused(f"{path}: its data is a {type(top).__name__}, not a scripted module")
    out: dict[str, torch.Tensor] = {}
    _walk(top, decls, "", out)
    return out
