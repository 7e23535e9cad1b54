"""The PureGen authors' published poison sets (Hugging Face dataset ``SunayBhat1/puregen-poisons``,
the layout their ``utils/purification.py`` reads), loaded without trusting the files.

Layout (relative to the dataset's root, or to a local copy passed as ``--poisons DIR``)::

    Narcissus/<dataset>/size=<s>_eps=<e>/best_noise_lab<k>.npy
        float (1, 3, s, s), the trigger for target class k in the [-1, 1] image space
    GradientMatching/<dataset>/<k>/poisons.pickle        (Tiny-ImageNet: .../tinyimagenet/
    GradientMatching/<dataset>/<k>/base_indices.pickle    ResNet34_250/<k>/...)
    GradientMatching/<dataset>/<k>/target.pickle          (optional)
        a list of (PIL image, label); the training-set indices the poisons replace; the
        (PIL image, original label) of the target test image
    Bullseye_Polytope/<dataset>/attack-results-<n>poisons/100-overlap/<mode>/<iters>/<k>/
        poison_<iters - 1, 5 digits>.pth
        a dict: ``poison``, a list of (image tensor normalised by the CIFAR-10 mean
        (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010), label); ``idx``, the
        indices of the base images; ``<mode>`` is ``linear-transfer-learning/mean`` or
        ``end2end-training/mean`` (``mean-<r>Repeat`` for 5 poisons)

``k`` is the target class for Narcissus and the attack trial for the other two (each trial has
its own target image and poison class; the authors ran trials 0-99 of Gradient Matching and
0-47 of Bullseye Polytope with 50 poisons). Narcissus' default here is the authors' code's
``size=32_eps=8``.

Trust. A pickle can run any code while it loads, so ``.pickle`` files go through
`safe_unpickle`: a restricted unpickler that admits only the globals these files need (the
PIL image class, whose state is checked and decoded here rather than by PIL; numpy arrays and
scalars of plain dtypes; torch tensors of plain dtypes, their storages read here; ``_codecs``
latin-1 bytes and ``collections.OrderedDict`` of protocol 2) and refuses any other global
before anything is called (`UnsafePickleError`, naming the global). ``.pth`` files (torch's zip
and legacy formats) are read by `_read_torch` through the same unpickler, not by ``torch.load``
(whose loader builds and hashes as it reads); ``.npy`` with ``allow_pickle=False``, header
checked first. Before anything is built, every pickle passes `pickle_scan.scan_pickle`
(nesting, items and bytes with shared references counted again, integer sizes); then sizes are
capped before data is decoded: file bytes, what a zip inflates to, storage bytes claimed,
shapes before any product or cast, pixels per image and in all, label and index ranges (the
``MAX_*`` constants below; README, "The authors' published poisons").

`poison_with_published` applies a poison set to a training set: Narcissus with
`puregen_fast.eval.poison.poison_dataset` (the last ``count`` images of the target class, or
random ones; STL-10's trigger remapped and resized as the authors', `STL10_TO_CIFAR10`);
Gradient Matching and Bullseye Polytope by replacing the images at their indices, checked to
be images of the poison class (clean label: the labels stay as they are). The authors' inputs
outside the poisons dataset are found here too: Gradient Matching's target image
(`find_gm_target`), Bullseye Polytope's target frog (`bp_target`) and training subset
(`bp_training_subset`).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from puregen_fast.data import pickle_scan
from puregen_fast.data.datasets import read_npy_header
from puregen_fast.data.pickle_scan import Budget, check_zip, read_member, scan_pickle
from puregen_fast.errors import UsageError
from puregen_fast.eval.poison import PoisonedSet, check_trigger, poison_dataset

__all__ = [
    "ATTACKS",
    "AUTHORS_DATASETS",
    "BP_MODES",
    "HF_REPO",
    "POISON_DATASETS",
    "PoisonImage",
    "PoisonSpec",
    "PublishedPoisons",
    "UnsafePickleError",
    "apply_published",
    "authors_dataset",
    "authors_narcissus",
    "bp_target",
    "bp_training_subset",
    "describe_selection",
    "find_gm_target",
    "load_bullseye_polytope",
    "load_gradient_matching",
    "load_narcissus",
    "locate_poisons",
    "poison_with_published",
    "read_torch_file",
    "resize_trigger",
    "safe_unpickle",
]

HF_REPO = "SunayBhat1/puregen-poisons"
ATTACKS = ("narcissus", "gradient-matching", "bullseye-polytope")
_FOLDER = {
    "narcissus": "Narcissus",
    "gradient-matching": "GradientMatching",
    "bullseye-polytope": "Bullseye_Polytope",
}
_TITLE = {
    "narcissus": "Narcissus",
    "gradient-matching": "Gradient Matching",
    "bullseye-polytope": "Bullseye Polytope",
}
# the data sets the authors' code reads each attack's poisons for (Narcissus: their
# get_poisoned_subset_narcissus opens cifar10, cinic10 and stl10 only, utils/purification.py
# 178-186, and its test-time set has no tinyimagenet branch, utils/classifier.py 1153-1166)
POISON_DATASETS = {
    "narcissus": ("cifar10", "cinic10", "stl10"),
    "gradient-matching": ("cifar10", "tinyimagenet"),
    "bullseye-polytope": ("cifar10",),
}
# every data set name the authors publish some poison for (--poisons-dataset)
AUTHORS_DATASETS = ("cifar10", "cinic10", "stl10", "tinyimagenet")
_NUM_CLASSES = {"cifar10": 10, "cinic10": 10, "stl10": 10, "tinyimagenet": 200}
BP_MODES = {"linear-transfer": "linear-transfer-learning", "fine-tune": "end2end-training"}
# the attack trials the authors ran (their scripts/purify.py)
_GM_TRIALS = 100
_BP_TRIALS = {50: 48, 5: 50}

# STL-10's classes (airplane, bird, car, cat, deer, dog, horse, monkey, ship, truck) to
# CIFAR-10's order: the authors' STL-10 trigger for STL-10 class k is the file
# best_noise_lab<STL10_TO_CIFAR10[k]>.npy (utils/purification.py 102-105); the labels of the
# images stay STL-10's
STL10_TO_CIFAR10 = {0: 0, 1: 2, 2: 1, 3: 3, 4: 4, 5: 5, 6: 7, 7: 6, 8: 8, 9: 9}
STL10_SIDE = 96  # the authors resize the STL-10 trigger to 96x96 (utils/purification.py 192)
# the authors' Narcissus poisoning per data set: (count, last_n, where it is stated); every
# other data set: 500, the last of the class (config.ini 24-25, utils/purification.py 199-201)
AUTHORS_NARCISSUS = {
    "cinic10": (900, False, "Configs/config.ini 210-215 ([CINIC]: num_images_narcissus = 900, "
                "last_n_narcissus = False)"),
}
AUTHORS_NARCISSUS_DEFAULT = (500, True, "Configs/config.ini 24-25")

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

# caps, checked before data is decoded (the authors' files are far below them: CIFAR-10
# Gradient Matching, 500 poisons of 32x32, is a 1.6 MB pickle; a Bullseye Polytope .pth of 50
# poisons 0.6 MB; the largest, Tiny-ImageNet's, about 12 MB)
MAX_FILE_BYTES = 256 << 20
MAX_IMAGE_PIXELS = 1024 * 1024  # per poison image
MAX_TOTAL_PIXELS = 1 << 26  # all poison images of a file together (192 MiB as RGB bytes)
MAX_POISONS = 1 << 20
MAX_TRIGGER_SIDE = 1024
MAX_LABEL = 1 << 20
MAX_INDEX = 1 << 40  # a training-set index
# what a pickle may ask to build (`puregen_fast.data.pickle_scan`): nesting, items, and bytes
# with every shared reference counted again, so sharing cannot make a file build more than
# the largest file read
MAX_PICKLE_DEPTH = pickle_scan.MAX_PICKLE_DEPTH
MAX_PICKLE_ITEMS = pickle_scan.MAX_PICKLE_ITEMS
MAX_PICKLE_BYTES = MAX_FILE_BYTES
# a .pth (zip) file: what its members inflate to, declared and actual, all together; the
# tensor bytes its storages hold; its member count and central directory
MAX_INFLATED_BYTES = MAX_FILE_BYTES
MAX_TENSOR_BYTES = MAX_FILE_BYTES
MAX_TENSOR_DIMS = 8
MAX_ZIP_MEMBERS = 1 << 14
_BUDGET = Budget(depth=MAX_PICKLE_DEPTH, items=MAX_PICKLE_ITEMS, nbytes=MAX_PICKLE_BYTES)


# ------------------------------------------------------------------------- restricted unpickling


class UnsafePickleError(UsageError):
    """A pickle names a global outside the allowed set; nothing of it was called."""


def _brief(v: Any) -> str:
    """An untrusted value for a message: short scalars as they are, anything else by its type
    and size (``str()`` of a shared or deeply nested structure can take forever)."""
    if isinstance(v, (str, bytes)) and len(v) <= 20:
        return repr(v)
    if type(v) is int and v.bit_length() <= 64 or type(v) in (float, bool, type(None)):
        return repr(v)
    if type(v) is int:
        return f"an integer of {v.bit_length()} bits"
    if isinstance(v, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
        return f"a {type(v).__name__} of length {len(v)}"
    return f"a {type(v).__name__}"


@dataclass(frozen=True)
class PoisonImage:
    """A PIL image as read from a poison pickle: ``array``, (H, W, 3) uint8."""

    array: np.ndarray


class _Placeholder:
    """A stand-in the unpickler builds instead of a real object; only these accept BUILD (their
    ``__setstate__`` checks the state), so no real object's ``__setstate__`` ever sees
    untrusted state."""

    value: Any = None

    def __setstate__(self, state: Any) -> None:  # overridden by each kind
        raise ValueError(f"unexpected state for {type(self).__name__}")


class _PickledImage(_Placeholder):
    """Stands in for ``PIL.Image.Image``: its state (info, mode, size, palette, raw bytes) is
    checked and kept as an (H, W, 3) uint8 array in ``value``; PIL never decodes it."""

    def __setstate__(self, state: Any) -> None:
        if self.value is not None:
            raise ValueError("a PIL image state given twice")
        if not isinstance(state, (list, tuple)) or len(state) < 5:
            raise ValueError("a PIL image state must be [info, mode, size, palette, data]")
        _info, mode, size, _palette, data = state[:5]
        channels = {"RGB": 3, "L": 1}.get(mode) if isinstance(mode, str) else None
        if channels is None:
            raise ValueError(f"PIL image mode {_brief(mode)}: only RGB (or L) images are read")
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(type(v) is int and 0 < v <= MAX_IMAGE_PIXELS for v in size)
        ):
            raise ValueError(f"PIL image size {_brief(size)}: expected (width, height)")
        w, h = size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"a {w}x{h} image is over the cap of {MAX_IMAGE_PIXELS} pixels")
        if not isinstance(data, (bytes, bytearray)) or len(data) != w * h * channels:
            raise ValueError(f"a {mode} {w}x{h} image needs {w * h * channels} bytes of data")
        a = np.frombuffer(bytes(data), np.uint8).reshape(h, w, channels)
        self.value = np.repeat(a, 3, axis=2) if channels == 1 else a.copy()


class _DtypeSpec(_Placeholder):
    """Stands in for a ``numpy.dtype`` of plain numbers (``value``: the real dtype)."""

    def __setstate__(self, state: Any) -> None:
        # (3, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if (
            not isinstance(state, tuple)
            or len(state) not in (8, 9)
            or state[1] not in ("<", ">", "|", "=")
            or any(v is not None for v in state[2:5])
            or (len(state) == 9 and state[8] is not None)
        ):
            raise ValueError("a numpy dtype state other than a plain number's")
        if state[1] in "<>":
            self.value = self.value.newbyteorder(state[1])


class _ArrayState(_Placeholder):
    """Stands in for a ``numpy.ndarray`` (``value``: the real array, built from checked bytes)."""

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5 or self.value is not None:
            raise ValueError("a numpy array state must be (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        self.value = _array(raw, dtype, shape, "F" if fortran is True else "C")


def _refuse(name: str) -> UnsafePickleError:
    return UnsafePickleError(name)


def _array(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, _DtypeSpec) or dtype.value is None:
        raise ValueError("a numpy array needs a plain dtype")
    if isinstance(raw, pickle.PickleBuffer):
        raw = bytes(raw.raw())
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError("numpy array data must be bytes")
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(type(v) is int and 0 <= v <= len(raw) for v in shape)
    ):
        raise ValueError(
            f"a numpy array shape must be a tuple of at most {MAX_TENSOR_DIMS} sizes, each at "
            "most its data's bytes"
        )
    if math.prod(shape) * dtype.value.itemsize != len(raw) or order not in ("C", "F"):
        raise ValueError("numpy array data does not match its shape")
    return np.frombuffer(bytes(raw), dtype.value).reshape(shape, order=order).copy()


def _reconstructor(cls: Any, base: Any, state: Any = None) -> _PickledImage:
    # copyreg._reconstructor: protocols 0 and 1 build objects this way
    if cls is not _PickledImage or base is not object or state is not None:
        raise _refuse("copyreg._reconstructor (of anything but a PIL image)")
    return _PickledImage()


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> _ArrayState:
    if subtype is not _NdarrayType or shape != (0,):
        raise _refuse("numpy _reconstruct (of anything but an ndarray)")
    return _ArrayState()


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` as the subtype argument of ``_reconstruct``."""

    def __new__(cls, *args: Any) -> Any:
        raise _refuse("numpy.ndarray (called directly)")


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> _DtypeSpec:
    if not isinstance(spec, str) or len(spec) > 4:
        raise _refuse(f"numpy.dtype({_brief(spec)})")
    d = np.dtype(spec)
    if d.hasobject or d.kind not in "biuf" or d.fields is not None or d.subdtype is not None:
        raise _refuse(f"numpy.dtype({spec!r}) (only plain numbers are read)")
    out = _DtypeSpec()
    out.value = d
    return out


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, _DtypeSpec) or not isinstance(data, bytes):
        raise _refuse("numpy scalar (of anything but a plain number)")
    if len(data) != dtype.value.itemsize:
        raise ValueError("numpy scalar data does not match its dtype")
    return np.frombuffer(data, dtype.value, count=1)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # protocol 5 arrays
    return _array(buf, dtype, shape, order)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # protocol 2 stores bytes as latin-1 text passed through _codecs.encode
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _refuse(f"_codecs.encode(..., {_brief(encoding)})")
    return text.encode("latin-1")


def _torch_storage(data: Any) -> Any:
    # torch.storage._load_from_bytes runs torch.load(weights_only=False) on a legacy-format
    # file; it is read here instead, through the same checks as a .pth
    import torch

    if not isinstance(data, bytes):
        raise ValueError("a tensor storage needs bytes")
    out = _read_torch(data, "a pickled tensor storage")
    if not isinstance(out, torch.storage.TypedStorage):
        raise ValueError("a pickled tensor storage that holds something else")
    return out


def _torch_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
    import torch
    from torch._utils import _rebuild_tensor

    if not isinstance(storage, torch.storage.TypedStorage) or hooks or meta:
        raise _refuse("torch._utils._rebuild_tensor_v2 (of anything but a plain tensor)")
    dims = (size, stride)
    if (
        not all(isinstance(d, tuple) and len(d) == len(size) <= MAX_TENSOR_DIMS for d in dims)
        or not all(type(v) is int and 0 <= v <= MAX_TENSOR_BYTES for d in dims for v in d)
        or type(offset) is not int
        or not 0 <= offset <= MAX_TENSOR_BYTES
    ):
        raise ValueError(
            f"a tensor's size and stride must be up to {MAX_TENSOR_DIMS} sizes of at most "
            f"{MAX_TENSOR_BYTES}"
        )
    n = storage._size()
    if math.prod(size) and offset + sum((k - 1) * st for k, st in zip(size, stride)) >= n:
        raise ValueError("a tensor reaches past its storage")
    if math.prod(size) > n:  # expand(): what a poison file never holds, and .numpy() copies
        raise ValueError(f"a tensor of {math.prod(size)} elements on a storage of {n}")
    return _rebuild_tensor(storage, offset, size, stride)


def _torch_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> Any:
    import torch

    if not isinstance(data, torch.Tensor) or hooks:
        raise _refuse("torch._utils._rebuild_parameter (of anything but a plain tensor)")
    return data


class _StorageType:
    """Stands in for ``torch.<Kind>Storage`` in a storage's persistent id (only the dtype)."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def __call__(self, *args: Any) -> Any:
        raise _refuse("torch storage types (called)")


_STORAGE_TYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}  # fmt: skip


_ALLOWED: dict[tuple[str, str], Any] = {
    ("PIL.Image", "Image"): _PickledImage,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,  # the base argument of _reconstructor
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _np_dtype,
    ("torch._utils", "_rebuild_tensor_v2"): _torch_tensor,
    ("torch._utils", "_rebuild_parameter"): _torch_parameter,
    ("torch.storage", "_load_from_bytes"): _torch_storage,
}
for _n, _d in _STORAGE_TYPES.items():
    _ALLOWED[("torch", _n)] = _StorageType(_d)
for _m in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_m}.multiarray", "_reconstruct")] = _np_reconstruct
    _ALLOWED[(f"{_m}.multiarray", "scalar")] = _np_scalar
    _ALLOWED[(f"{_m}.numeric", "_frombuffer")] = _np_frombuffer


def _load_build(self: pickle._Unpickler) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) is OrderedDict and isinstance(state, dict) and set(state) == {"_metadata"}:
        return  # a torch state dict's version record (Module.state_dict): not needed, dropped
    if not isinstance(inst, _Placeholder):
        raise ValueError(f"object state (BUILD) for a {type(inst).__name__}")
    inst.__setstate__(state)


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler with ``find_class`` limited to `_ALLOWED` and BUILD limited to
    the placeholders (the pure-Python class is used because its opcode table can be changed)."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # protocols 0-2 spell some modules as Python 2 did (copy_reg, ...)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _ALLOWED.get((module, name))
        if found is None:  # the names come from the file: a few hundred bytes of them at most
            raise _refuse(f"{module[:100]}.{name[:100]}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse("a persistent id")


class _TorchUnpickler(_RestrictedUnpickler):
    """`_RestrictedUnpickler` for the pickle of a ``torch.save`` file: its persistent ids name
    tensor storages, which ``storage(key, dtype, numel)`` supplies."""

    def __init__(self, data: bytes, storage: Any) -> None:
        super().__init__(io.BytesIO(data))
        self.storage = storage

    def find_class(self, module: str, name: str) -> Any:
        # a torch file names its storages by persistent id; a pickled file inside would nest
        # one reader in another without end
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            raise _refuse("torch.storage._load_from_bytes (inside a torch file)")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise ValueError("a persistent id other than a tensor storage's")
        _, kind, key, location, numel = pid[:5]
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("a storage view (of torch's oldest format)")
        if (
            not isinstance(kind, _StorageType)
            or not isinstance(key, str)
            or not 0 < len(key) <= 64
            or not isinstance(location, str)
            or type(numel) is not int
        ):
            raise ValueError("a malformed tensor storage id")
        if not 0 <= numel <= MAX_TENSOR_BYTES:
            raise ValueError(
                f"a storage of {_brief(numel)} elements, over the limit of {MAX_TENSOR_BYTES} "
                "tensor bytes"
            )
        return self.storage(key, kind.dtype, numel)


def _unpickle(data: bytes, what: str, storage: Any = None) -> Any:
    scan_pickle(data, _BUDGET, what)  # nesting and sizes bounded before anything is built
    if storage is None:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    return _TorchUnpickler(data, storage).load()


def _new_storage(dtype_name: str, raw: bytes | bytearray) -> Any:
    import torch

    dtype = getattr(torch, dtype_name)
    buf = raw if isinstance(raw, bytearray) else bytearray(raw)  # torch wants it writable
    flat = torch.frombuffer(buf, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return torch.storage.TypedStorage(
        wrap_storage=flat.untyped_storage(), dtype=dtype, _internal=True
    )


def _itemsize(dtype_name: str) -> int:
    import torch

    return getattr(torch, dtype_name).itemsize


class _Storages:
    """The storages of one torch file, each made once (tensors share them), their bytes
    together capped at `MAX_TENSOR_BYTES`, and at ``room`` (what the file can hold), before
    any is allocated."""

    def __init__(self, read: Any, room: int) -> None:
        self.read, self.room, self.made, self.total = read, room, {}, 0

    def __call__(self, key: str, dtype: str, numel: int) -> Any:
        if key in self.made:
            st, d = self.made[key]
            if d != dtype or st._size() != numel:
                raise ValueError("one storage named with two dtypes or sizes")
            return st
        nbytes = numel * _itemsize(dtype)
        self.total += nbytes
        if self.total > MAX_TENSOR_BYTES:
            raise ValueError(
                f"its storages claim over the limit of {MAX_TENSOR_BYTES} tensor bytes"
            )
        if self.total > self.room:
            raise ValueError(f"its storages claim more than the {self.room} bytes that hold them")
        st = _new_storage(dtype, self.read(key, nbytes))
        self.made[key] = (st, dtype)
        return st


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def read_torch_file(path: Path, flag: str) -> Any:
    """A ``torch.save`` file's object read by `_read_torch` (tensors of plain numbers and
    builtin containers only; nothing in it runs), the file capped at `MAX_FILE_BYTES`;
    UsageError naming ``flag`` and the file otherwise."""
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file (a torch.save file of a state dict)")
    data = _read_capped(path)
    try:
        return _read_torch(data, "the file")
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{flag} {path}: refused to unpickle the global '{e}': only "
                                "tensors and builtin containers are read") from None  # fmt: skip
    except Exception as e:
        raise UsageError(f"{flag} {path}: not loadable as a torch.save file of tensors "
                         f"({type(e).__name__}: {str(e)[:200]})") from e  # fmt: skip


def _read_torch(data: bytes, what: str) -> Any:
    """A ``torch.save`` file's object, read here rather than by torch: every pickle through
    `scan_pickle` and `_RestrictedUnpickler` (tensors of plain dtypes allowed), storages built
    from checked bytes. The zip format (torch >= 1.6) and the legacy one (a pickled storage,
    older .pth files). ValueError (or UnsafePickleError, naming a global)."""
    if data[:4] == b"PK\x03\x04":
        return _read_torch_zip(data, what)
    return _read_torch_legacy(data, what)


def _read_torch_zip(data: bytes, what: str) -> Any:
    z, pkl = check_zip(io.BytesIO(data), MAX_INFLATED_BYTES, MAX_ZIP_MEMBERS)
    with z:
        prefix = pkl[: -len("data.pkl")]
        if f"{prefix}byteorder" in z.NameToInfo:
            order = read_member(z, f"{prefix}byteorder", 16)
            if order != b"little":
                raise ValueError(f"written on a {_brief(order)}-endian machine")

        def read(key: str, nbytes: int) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in z.NameToInfo:
                raise ValueError(f"storage {key!r} is missing")
            if z.getinfo(name).file_size != nbytes:
                raise ValueError(f"storage {key!r} does not hold the bytes its id says")
            return read_member(z, name, nbytes)

        return _unpickle(
            read_member(z, pkl, MAX_PICKLE_BYTES),
            f"{what} data.pkl",
            _Storages(read, MAX_INFLATED_BYTES),
        )


def _read_torch_legacy(data: bytes, what: str) -> Any:
    # five pickles (magic number, protocol, sys_info, the object, the storage keys), then
    # each storage in the keys' order: its element count (int64) and its bytes
    bounds, pos = [], 0
    for i in range(5):
        end = scan_pickle(data, _BUDGET, f"{what} pickle {i + 1}", pos)
        bounds.append((pos, end))
        pos = end
    magic, proto, info = (_unpickle(data[a:b], what) for a, b in bounds[:3])
    if magic != _LEGACY_MAGIC or proto != _LEGACY_PROTOCOL:
        raise ValueError("not a torch.save file (no torch magic number)")
    if not isinstance(info, dict) or info.get("little_endian", True) is not True:
        raise ValueError("written on a big-endian machine, or its sys_info is malformed")

    buffers: dict[str, bytearray] = {}

    def claim(key: str, nbytes: int) -> bytearray:  # filled from the raw section below
        buffers[key] = bytearray(nbytes)  # at most the bytes that follow (_Storages checked)
        return buffers[key]  # the storage shares its memory

    storages = _Storages(claim, len(data) - pos)
    obj = _unpickle(data[bounds[3][0] : bounds[3][1]], what, storages)
    keys = _unpickle(data[bounds[4][0] : bounds[4][1]], what)
    if (
        not isinstance(keys, list)
        or not all(isinstance(k, str) for k in keys)
        or sorted(keys) != sorted(storages.made)
    ):
        raise ValueError("its storage keys do not match its storages")
    view = memoryview(data)
    for key in keys:
        st, _ = storages.made[key]
        buf = buffers[key]
        if pos + 8 > len(data) or int.from_bytes(data[pos : pos + 8], "little") != st._size():
            raise ValueError(f"storage {key!r} does not hold the elements its id says")
        pos += 8
        if pos + len(buf) > len(data):
            raise ValueError(f"storage {key!r} is truncated")
        buf[:] = view[pos : pos + len(buf)]
        pos += len(buf)
    return obj


def _resolve(obj: Any, depth: int = 0) -> Any:
    """Placeholders replaced by their values (images and arrays), in lists, tuples and dicts."""
    if depth > 20:
        raise ValueError("nested too deeply")
    if isinstance(obj, _Placeholder):
        if obj.value is None:
            raise ValueError(f"{type(obj).__name__} without its state")
        return PoisonImage(obj.value) if isinstance(obj, _PickledImage) else obj.value
    if isinstance(obj, list):
        return [_resolve(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, depth + 1) for v in obj)
    if isinstance(obj, dict):
        return {k: _resolve(v, depth + 1) for k, v in obj.items()}
    return obj


def safe_unpickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` admitting only the globals of the authors' poison files (module doc).

    PIL images come back as `PoisonImage` ((H, W, 3) uint8 in ``.array``), numpy arrays as
    arrays. Any other global raises
    `UnsafePickleError` naming it, before anything is called; any other problem is a
    UsageError naming the file.
    """
    p = Path(path)
    data = _read_capped(p)
    try:
        return _resolve(_unpickle(data, "the pickle"))
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{p}: refused to unpickle the global '{e}': only PIL images, builtin containers "
            "and numpy arrays are allowed in poison files, so nothing of it was run. This is "
            "not a poison file as the authors publish it; delete it and fetch the original"
        ) from None
    except Exception as e:  # any malformed pickle: truncated, wrong opcodes, bad states
        raise UsageError(
            f"{p}: not a readable poison pickle ({type(e).__name__}: {str(e)[:200]}); "
            "fetch the file again"
        ) from e


def _read_capped(p: Path) -> bytes:
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise UsageError(f"{p}: not a regular file")
        if size > MAX_FILE_BYTES:
            raise UsageError(f"{p}: {size} bytes, over the cap of {MAX_FILE_BYTES} for poisons")
        return p.read_bytes()
    except OSError as e:
        raise UsageError(f"{p}: cannot read ({e})") from e


# ----------------------------------------------------------------------------- what to load


@dataclass(frozen=True)
class PoisonSpec:
    """Which published poison file(s): ``attack`` (one of `ATTACKS`), ``dataset`` (the
    authors' data set name, `POISON_DATASETS`), ``target`` (``k`` of the module doc), and the
    attack's settings as the folder names spell them."""

    attack: str
    dataset: str
    target: int
    narcissus_size: int = 32
    narcissus_eps: int = 8
    bp_poisons: int = 50
    bp_mode: str = "linear-transfer"
    bp_iters: int = 800
    bp_repeat: int = 1

    def check(self, num_classes: int | None = None) -> None:
        """UsageError (naming the flag) for an unknown attack, data set, setting or target."""
        if self.attack not in ATTACKS:
            raise UsageError(f"--attack {self.attack!r}: choose one of {', '.join(ATTACKS)}")
        if self.attack == "narcissus" and self.dataset == "tinyimagenet":
            raise UsageError(
                "--poisons-dataset tinyimagenet: the authors' code has no Narcissus path for "
                "Tiny-ImageNet (utils/purification.py 178-186 poisons cifar10, cinic10 and stl10 "
                "only), so no published number uses a Tiny-ImageNet trigger. Give a trigger of "
                "your own with --trigger FILE (e.g. from `puregen-fast eval trigger --method "
                "narcissus --dataset tinyimagenet ...`) instead of --poisons"
            )
        known = POISON_DATASETS[self.attack]
        if self.dataset not in known:
            raise UsageError(
                f"--poisons-dataset {self.dataset!r}: the authors publish {_TITLE[self.attack]} "
                f"poisons for {', '.join(known)}"
            )
        if self.attack == "narcissus":
            k = num_classes or _NUM_CLASSES[self.dataset]
            what = f"{self.dataset} has {k} classes"
        elif self.attack == "gradient-matching":
            k, what = _GM_TRIALS, f"the authors ran trials 0..{_GM_TRIALS - 1}"
        else:
            if self.bp_poisons not in _BP_TRIALS:
                raise UsageError(f"--bp-poisons {self.bp_poisons}: the authors publish 5 or 50")
            if self.bp_mode not in BP_MODES:
                raise UsageError(f"--bp-mode {self.bp_mode!r}: choose {', '.join(BP_MODES)}")
            k = _BP_TRIALS[self.bp_poisons]
            what = f"the authors ran trials 0..{k - 1} with {self.bp_poisons} poisons"
        if not 0 <= self.target < k:
            raise UsageError(f"--target-class {self.target}: out of range ({what})")

    @property
    def title(self) -> str:
        return f"{_TITLE[self.attack]} poisons for {self.dataset} (target {self.target})"

    @property
    def trigger_index(self) -> int:
        """Narcissus: the ``k`` of the trigger file for target class ``target``: STL-10's
        classes in CIFAR-10's order (`STL10_TO_CIFAR10`), else ``target`` itself."""
        if self.dataset == "stl10":
            return STL10_TO_CIFAR10[self.target]
        return self.target

    def folder(self) -> str:
        """The folder (relative to the root) that holds this poison set's files."""
        top = f"{_FOLDER[self.attack]}/{self.dataset}"
        if self.attack == "narcissus":
            return f"{top}/size={self.narcissus_size}_eps={self.narcissus_eps}"
        if self.attack == "gradient-matching":
            sub = "ResNet34_250/" if self.dataset == "tinyimagenet" else ""
            return f"{top}/{sub}{self.target}"
        mode = BP_MODES.get(self.bp_mode, self.bp_mode)
        mean = f"mean-{self.bp_repeat}Repeat" if self.bp_poisons == 5 else "mean"
        return (
            f"{top}/attack-results-{self.bp_poisons}poisons/100-overlap/{mode}/{mean}/"
            f"{self.bp_iters}/{self.target}"
        )

    def required_files(self) -> list[str]:
        f = self.folder()
        if self.attack == "narcissus":
            return [f"{f}/best_noise_lab{self.trigger_index}.npy"]
        if self.attack == "gradient-matching":
            return [f"{f}/poisons.pickle", f"{f}/base_indices.pickle"]
        return [f"{f}/poison_{self.bp_iters - 1:05d}.pth"]

    def optional_files(self) -> list[str]:
        return [f"{self.folder()}/target.pickle"] if self.attack == "gradient-matching" else []


# ----------------------------------------------------------------------------- where the files are


def _hub_command(spec: PoisonSpec, repo: str, local: str) -> str:
    from puregen_fast.models.checkpoints import _hub_cli

    gm = spec.attack == "gradient-matching"
    pattern = f"{spec.folder()}/*" if gm else spec.required_files()[0]  # GM: target.pickle too
    return (
        f"`{_hub_cli()} download {repo} --repo-type dataset --include '{pattern}' "
        f"--local-dir {local}`"
    )


def _missing_message(spec: PoisonSpec, root: Path, missing: list[str], head: str, repo: str) -> str:
    lines = "\n".join(f"  {root / f}" for f in missing)
    local = root if root.name != "" else Path(repo.split("/")[-1])
    return (
        f"{head}: {len(missing)} file(s) of the authors' {spec.title} are missing; place them "
        f"at\n{lines}\nand pass `--poisons {local}`. On a machine with network: "
        f"{_hub_command(spec, repo, str(local))}, then copy the folder here."
    )


def _other_datasets(root: Path, spec: PoisonSpec) -> list[str]:
    top = root / _FOLDER[spec.attack]
    try:
        return sorted(d.name for d in top.iterdir() if d.is_dir() and d.name != spec.dataset)
    except OSError:
        return []


def locate_poisons(spec: PoisonSpec, source: str | None = None) -> Path:
    """The root folder holding ``spec``'s files: ``source`` a local copy of the dataset (the
    folder with ``Narcissus/`` etc., or the authors' ``<data_dir>`` with ``PureGen_Poisons/``
    in it), or ``hf:owner/name`` / None (the authors' dataset, only ``spec``'s files fetched
    into the Hugging Face cache). UsageError listing every missing file and where it goes."""
    spec.check()
    src = source or f"hf:{HF_REPO}"
    if src.startswith("hf:"):
        repo = src[3:]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise UsageError(f"--poisons {src!r}: expected hf:owner/name or a folder")
        local = Path(repo.split("/")[-1])
        try:
            from huggingface_hub import snapshot_download

            root = Path(
                snapshot_download(
                    repo_id=repo,
                    repo_type="dataset",
                    allow_patterns=spec.required_files() + spec.optional_files(),
                )
            )
        except Exception as e:  # offline, no such repo, ...
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            head = (
                f"--poisons {src}: could not fetch from the Hugging Face Hub "
                f"({type(e).__name__}: {reason})"
            )
            msg = _missing_message(spec, local, spec.required_files(), head, repo)
            raise UsageError(msg) from e
        head = f"--poisons {src}"
    else:
        repo = HF_REPO
        root = Path(src).expanduser()
        if not root.is_dir():
            raise UsageError(
                f"--poisons {root}: no such folder (a copy of the authors' poisons dataset, or "
                f"hf:{HF_REPO})"
            )
        if not (root / _FOLDER[spec.attack]).is_dir() and (root / "PureGen_Poisons").is_dir():
            root = root / "PureGen_Poisons"  # the authors' <data_dir> layout
        head = f"--poisons {root}"
    missing = [f for f in spec.required_files() if not (root / f).is_file()]
    if missing:
        others = _other_datasets(root, spec)
        if others and not (root / _FOLDER[spec.attack] / spec.dataset).exists():
            raise UsageError(
                f"{head} holds the authors' {_TITLE[spec.attack]} poisons for "
                f"{', '.join(others)}, not for {spec.dataset}: a poisons folder for another "
                f"data set. Pass --poisons-dataset {others[0]} with that data set, or fetch "
                f"{spec.dataset}'s poisons"
            )
        raise UsageError(_missing_message(spec, root, missing, head, repo))
    return root


# ----------------------------------------------------------------------------- loaders


@dataclass
class PublishedPoisons:
    """A Gradient Matching or Bullseye Polytope poison set: ``images`` uint8 (n, H, W, 3) that
    replace the training images at ``indices`` (n,), their ``labels`` (n,) (the poison class:
    clean label), and the target image with its own label where the files have it."""

    attack: str
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    source: str
    target_image: np.ndarray | None = None
    target_label: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def poison_label(self) -> int:
        """The class the poisons carry (the authors take the first poison's label)."""
        return int(self.labels[0])


def _as_int(v: Any, what: str, stop: int) -> int:
    """``v`` (an int, numpy integer or one-element integer tensor) in 0..stop-1, checked
    before it is cast (2**70 does not fit an int64)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        try:
            import torch

            if (
                isinstance(v, torch.Tensor)
                and v.numel() == 1
                and v.layout == torch.strided
                and v.device.type == "cpu"
                and not v.is_floating_point()
                and v.dtype != torch.bool
            ):
                return _as_int(int(v.item()), what, stop)
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        raise ValueError(f"{what} must be an integer, got {type(v).__name__}")
    i = int(v)
    if not 0 <= i < stop:
        raise ValueError(f"{what} out of range 0..{stop - 1} (got {_brief(i)})")
    return i


def _labels(values: list[Any], what: str) -> np.ndarray:
    return np.array([_as_int(v, what, MAX_LABEL) for v in values], np.int64)


def _indices(obj: Any, n: int) -> np.ndarray:
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.device.type != "cpu" or obj.is_complex():
                raise ValueError(f"indices must be a dense integer tensor, got {obj.layout}")
            obj = obj.detach().numpy()  # a view: nothing is copied before the checks below
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1 or obj.dtype.kind not in "iu":
            raise ValueError(f"indices must be a 1-D integer array, got {obj.dtype} {obj.shape}")
        if obj.shape != (n,):  # before any copy: an expanded tensor claims any size
            raise ValueError(f"{obj.shape[0]} indices for {n} poison images")
        if obj.size and (obj.min() < 0 or obj.max() >= MAX_INDEX):
            raise ValueError(f"indices out of range 0..{MAX_INDEX - 1}")
        idx = obj.astype(np.int64)
    elif isinstance(obj, (list, tuple)):
        if len(obj) != n:
            raise ValueError(f"{len(obj)} indices for {n} poison images")
        idx = np.array([_as_int(v, "an index", MAX_INDEX) for v in obj], np.int64)
    else:
        raise ValueError(f"indices must be a list or an array, got {type(obj).__name__}")
    if np.unique(idx).size != idx.size:
        raise ValueError("repeated indices")
    return idx


def _stack(images: list[np.ndarray], what: str) -> np.ndarray:
    if not images:
        raise ValueError(f"{what}: no images")
    if len(images) > MAX_POISONS:
        raise ValueError(f"{what}: {len(images)} images, over the cap of {MAX_POISONS}")
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(f"{what}: images of different sizes {sorted(shapes)[:3]}")
    h, w, _ = images[0].shape
    if len(images) * h * w > MAX_TOTAL_PIXELS:
        raise ValueError(f"{what}: {len(images)} images of {w}x{h}, over {MAX_TOTAL_PIXELS} pixels")
    return np.stack(images)


def _pairs(obj: Any, what: str) -> tuple[list[Any], list[Any]]:
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"{what} must be a list of (image, label), got {type(obj).__name__}")
    if len(obj) > MAX_POISONS:
        raise ValueError(f"{what}: {len(obj)} entries, over the cap of {MAX_POISONS}")
    firsts, seconds = [], []
    for i, item in enumerate(obj):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"{what}[{i}] is not an (image, label) pair")
        firsts.append(item[0])
        seconds.append(item[1])
    return firsts, seconds


def load_gradient_matching(
    folder: str | os.PathLike[str], target: str | os.PathLike[str] | None = None
) -> PublishedPoisons:
    """``poisons.pickle`` + ``base_indices.pickle`` of one Gradient Matching trial folder, and
    the target image from ``target`` (a ``target.pickle``; None: the folder's, if present),
    through `safe_unpickle`."""
    d = Path(folder)
    target_file = Path(target) if target is not None else d / "target.pickle"
    poisons = safe_unpickle(d / "poisons.pickle")
    base = safe_unpickle(d / "base_indices.pickle")
    where = d / "poisons.pickle"
    try:
        imgs, labs = _pairs(poisons, "poisons.pickle")
        if not all(isinstance(a, PoisonImage) for a in imgs):
            raise ValueError("poisons.pickle: entries must be (PIL image, label)")
        images = _stack([a.array for a in imgs], "poisons.pickle")
        labels = _labels(labs, "a poison label")
        where = d / "base_indices.pickle"
        idx = _indices(base, len(images))
        t_img = t_lab = None
        if target is not None or target_file.is_file():
            where = target_file
            t = safe_unpickle(where)
            (ti,), (tl,) = _pairs([t], "target.pickle")
            if not isinstance(ti, PoisonImage):
                raise ValueError("target.pickle must hold (PIL image, label)")
            t_img, t_lab = ti.array, _as_int(tl, "the target label", MAX_LABEL)
    except ValueError as e:
        raise UsageError(f"{where}: not a Gradient Matching poison file as published ({e})") from e
    return PublishedPoisons("gradient-matching", images, labels, idx, str(d), t_img, t_lab)


def _unnormalise(t: Any) -> np.ndarray:
    """The authors' ``ToPILImage(Normalize(-mean/std, 1/std)(t))`` in float32, op for op, with
    out-of-range values clamped (torchvision's byte cast would wrap them around)."""
    import torch

    mean = torch.tensor([-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)], dtype=torch.float32)
    std = torch.tensor([1 / s for s in CIFAR_STD], dtype=torch.float32)
    u = (t.float() - mean[:, None, None]) / std[:, None, None]
    u = u.mul(255).clamp_(0, 255)
    return u.to(torch.uint8).permute(1, 2, 0).numpy()  # truncation, as .byte()


def load_bullseye_polytope(path: str | os.PathLike[str]) -> PublishedPoisons:
    """A Bullseye Polytope ``poison_<iters-1>.pth``: a dict with ``poison`` (a list of
    (normalised tensor (3, H, W), label)) and ``idx``, read as ``torch.load(weights_only=True)``
    would, but by `_read_torch`: its pickle through the same checks as the other poison files
    (nesting, sizes and globals), what it inflates to capped."""
    import torch

    p = Path(path)
    data = _read_capped(p)  # the size cap and a readable regular file
    try:
        obj = _read_torch(data, "the file")
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{p}: refused to unpickle the global '{e}': only tensors of plain numbers and "
            "builtin containers are allowed in a Bullseye Polytope file, so nothing of it was "
            "run. This is not a poison file as the authors publish it; fetch the original"
        ) from None
    except Exception as e:  # malformed zip or pickle, a limit, a bad storage
        raise UsageError(
            f"{p}: not loadable as a torch.save file of tensors ({type(e).__name__}: "
            f"{str(e)[:200]}); fetch the file again"
        ) from e
    try:
        if not isinstance(obj, dict) or "poison" not in obj or "idx" not in obj:
            raise ValueError("expected a dict with 'poison' and 'idx'")
        tens, labs = _pairs(obj["poison"], "'poison'")
        pixels = 0
        for t in tens:
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError("'poison' images must be float tensors")
            if t.layout != torch.strided or t.device.type != "cpu":
                raise ValueError(f"'poison' images must be dense tensors, got {t.layout}")
            shape = tuple(t.shape[-3:]) if t.dim() in (3, 4) else ()
            if t.dim() == 4 and t.shape[0] != 1 or len(shape) != 3 or shape[0] != 3:
                raise ValueError(f"'poison' images must be (3, H, W), got {tuple(t.shape)}")
            if shape[1] * shape[2] > MAX_IMAGE_PIXELS:
                raise ValueError(f"a {shape[2]}x{shape[1]} image is over the pixel cap")
            pixels += shape[1] * shape[2]
            if pixels > MAX_TOTAL_PIXELS:
                raise ValueError(f"the poison images are over {MAX_TOTAL_PIXELS} pixels in all")
            if not torch.isfinite(t).all():
                raise ValueError("'poison' images hold NaN or infinite values")
        images = _stack([_unnormalise(t.reshape(t.shape[-3:])) for t in tens], "'poison'")
        labels = _labels(labs, "a poison label")
        idx = _indices(obj["idx"], len(images))
    except ValueError as e:
        raise UsageError(f"{p}: not a Bullseye Polytope poison file as published ({e})") from e
    return PublishedPoisons("bullseye-polytope", images, labels, idx, str(p))


def load_narcissus(
    path: str | os.PathLike[str], image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """A Narcissus ``best_noise_lab<k>.npy``: float (1, 3, s, s) (or (3, s, s)), the header
    checked before the data is read; float32 (1, 3, s, s) back (`check_trigger`)."""
    p = Path(path)
    fmt = np.lib.format
    try:
        if p.stat().st_size > MAX_FILE_BYTES:
            raise UsageError(f"{p}: over the cap of {MAX_FILE_BYTES} bytes for a trigger")
        with open(p, "rb") as f:
            shape, fortran, dtype = read_npy_header(f, str(p))
            ok = (
                dtype.kind == "f"
                and not dtype.hasobject
                and len(shape) in (3, 4)
                and all(0 < s <= MAX_TRIGGER_SIDE for s in shape[-2:])
                and shape[-3] == 3
                and (len(shape) == 3 or shape[0] == 1)
            )
            if not ok:
                raise UsageError(
                    f"{p}: a Narcissus trigger is a float (1, 3, s, s) array with s <= "
                    f"{MAX_TRIGGER_SIDE}, this file holds {dtype} {shape}"
                )
            f.seek(0)
            t = fmt.read_array(f, allow_pickle=False)
    except UsageError:
        raise
    except (OSError, ValueError, EOFError) as e:  # numpy's message may quote a 10 KB header
        raise UsageError(
            f"{p}: not a readable .npy trigger ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    what = f"{p} (a Narcissus trigger)"
    t = check_trigger(t, None, what=what)
    if image_hw is not None and (t.shape[2] > image_hw[0] or t.shape[3] > image_hw[1]):
        raise UsageError(
            f"{what} is {t.shape[3]}x{t.shape[2]} but the training images are "
            f"{image_hw[1]}x{image_hw[0]}: poisons made for another data set"
        )
    return t


def gm_target_candidates(
    spec: PoisonSpec, root: Path | None, given: str | os.PathLike[str] | None = None
) -> list[tuple[Path, str]]:
    """Where a Gradient Matching trial's ``target.pickle`` may be, in the order looked at, each
    with what put it there. ``given`` (``--target-image``): a ``target.pickle`` file, or a
    folder laid out as the authors' ``<data_dir>`` (``Poisons/GradientMatching/...``) or as
    their ``Poisons`` folder (``GradientMatching/...``). Then the trial's poison folder (a
    copy of the poisons dataset may hold it), then, when ``root`` is the authors'
    ``<data_dir>/PureGen_Poisons``, ``<data_dir>/Poisons/GradientMatching/...``: the authors
    read the target from there, outside the poisons dataset (utils/classifier.py 1122-1127,
    1203-1209), the poisons from ``PureGen_Poisons`` (utils/purification.py 88-92)."""
    rel = Path(spec.folder()) / "target.pickle"
    out: list[tuple[Path, str]] = []
    if given is not None:
        g = Path(given).expanduser()
        if g.is_dir():
            out.append((g / "Poisons" / rel, f"--target-image {g} (the authors' <data_dir>)"))
            out.append((g / rel, f"--target-image {g} (the authors' Poisons folder)"))
        else:
            out.append((g, "--target-image"))
        return out
    if root is not None:
        out.append((root / rel, f"the poison folder (--poisons {root})"))
        if root.name == "PureGen_Poisons":
            out.append((root.parent / "Poisons" / rel,
                        "the authors' <data_dir>/Poisons (utils/classifier.py 1125)"))  # fmt: skip
    return out


def find_gm_target(
    spec: PoisonSpec, root: Path | None, given: str | os.PathLike[str] | None = None
) -> tuple[Path, str]:
    """The ``target.pickle`` of a Gradient Matching trial and where it was found
    (`gm_target_candidates`); UsageError naming every place looked at and the flag to give."""
    cands = gm_target_candidates(spec, root, given)
    for path, why in cands:
        if path.is_file():
            return path, why
    looked = "\n".join(f"  {p} ({why})" for p, why in cands)
    raise UsageError(
        f"Gradient Matching trial {spec.target}: no target image (target.pickle), so its "
        f"success cannot be measured. Looked at:\n{looked}\nThe authors keep it outside the "
        f"poisons dataset, at <data_dir>/Poisons/{spec.folder()}/target.pickle "
        "(utils/classifier.py 1125); pass --target-image FILE|DIR (that file, or the folder "
        "holding Poisons/ or GradientMatching/)"
    )


# Bullseye Polytope's target: a frog of the CIFAR-10 transfer split's 'others' images, the
# (trial + 51)-th (num_per_class = 50 frogs are skipped: utils/classifier.py 1133-1135 and
# 1171-1200, config.ini 106); the attack wants it called a ship (class 8: purification.py 139)
BP_TARGET_LABEL = 6
BP_TARGET_SKIP = 50
BP_POISON_CLASS = 8


def bp_target_index(labels: np.ndarray, trial: int, *, skip: int = BP_TARGET_SKIP) -> int | None:
    """The index, in the transfer split's ``others`` images, of Bullseye Polytope trial
    ``trial``'s target image (`BP_TARGET_LABEL`); None when the set has too few frogs."""
    frogs = np.flatnonzero(np.asarray(labels) == BP_TARGET_LABEL)
    return int(frogs[trial + skip]) if trial + skip < frogs.size else None


def bp_target(labels: np.ndarray, trial: int, *, skip: int = BP_TARGET_SKIP) -> int:
    """`bp_target_index`, or UsageError (naming the flag) when the set has too few frogs."""
    i = bp_target_index(labels, trial, skip=skip)
    if i is None:
        frogs = np.flatnonzero(np.asarray(labels) == BP_TARGET_LABEL)
        raise UsageError(
            f"--target-class {trial}: Bullseye Polytope's target is frog number {trial + skip + 1} "
            f"(class {BP_TARGET_LABEL}) of the transfer split's 'others' images, the training "
            f"set has {frogs.size} frogs (utils/classifier.py 1134): pass the 'others' split of "
            "the authors' CIFAR10_TRAIN_Split.pth, as .npz in its order"
        )
    return i


BP_PER_CLASS = 50  # num_per_class of [LINEAR_TRANSFER] and [FINE_TUNE] (config.ini 106, 127)


def bp_training_subset(labels: np.ndarray, poison_idx: np.ndarray,
                       per_class: int = BP_PER_CLASS) -> np.ndarray:  # fmt: skip
    """The images the authors' Bullseye Polytope victims train on, as sorted indices into the
    transfer split's ``others``: every poison, then the first images of each class that are
    not poisons until the class, its poisons counted, has ``per_class``
    (Poisoned_Dataset_Base.get_valid_indices, utils/classifier.py 353-379, with num_per_label
    = num_per_class, 199-200). The target frog comes later in its class, so it is left out."""
    y = np.asarray(labels)
    pois = {int(i) for i in np.asarray(poison_idx)}
    count: dict[int, int] = {}
    for i in pois:
        count[int(y[i])] = count.get(int(y[i]), 0) + 1
    keep = list(pois)
    for i, c in enumerate(y.tolist()):
        if i not in pois and count.get(c, 0) < per_class:
            keep.append(i)
            count[c] = count.get(c, 0) + 1
    return np.sort(np.asarray(keep, np.int64))


def resize_trigger(trigger: np.ndarray, side: int) -> np.ndarray:
    """``trigger`` (1, 3, h, w) resized to ``side`` x ``side`` by bilinear interpolation with
    ``align_corners=False``, in float32: the authors' STL-10 trigger (utils/purification.py
    191-193)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(trigger, np.float32))
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False).numpy()


def authors_dataset(dataset: str, poisons_dataset: str | None = None) -> tuple[str, str | None]:
    """The authors' name for the data set whose poisons a training set ``dataset`` takes
    (``poisons_dataset`` when given), and a note when that is not the authors' own pairing:
    ``cinic10-imagenet`` (CINIC-10's ImageNet part) takes the ``cinic10`` poisons, but the
    authors poison the full CINIC-10 training set (their ``cinic10``, utils/purification.py
    181-183), never that part alone."""
    if poisons_dataset is not None:
        return poisons_dataset, None
    if dataset == "cinic10-imagenet":
        return "cinic10", (
            "--dataset cinic10-imagenet takes the authors' cinic10 poisons; they poison the full "
            "CINIC-10 training set (--dataset cinic10), never its ImageNet part alone, so no "
            "published number is for this pairing"
        )
    return dataset, None


def authors_narcissus(dataset: str) -> tuple[int, bool, str]:
    """The authors' Narcissus poisoning of ``dataset`` (their name): (count, last_n, where it
    is stated) (`AUTHORS_NARCISSUS`)."""
    return AUTHORS_NARCISSUS.get(dataset, AUTHORS_NARCISSUS_DEFAULT)


def describe_selection(n_class: int, target: int, count: int | None, last_n: bool, seed: int
                       ) -> str:  # fmt: skip
    """Which images of the target class a Narcissus poisoning takes, in words."""
    if count is None:
        return f"all {n_class} training images of class {target}"
    if last_n:
        return (f"the last {count} of the {n_class} training images of class {target} (data "
                "set order)")  # fmt: skip
    return (f"{count} of the {n_class} training images of class {target} drawn at random "
            f"(numpy default_rng({seed}))")  # fmt: skip


# ----------------------------------------------------------------------------- poisoning a set


def apply_published(
    images: np.ndarray, labels: np.ndarray, pp: PublishedPoisons
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``images`` with the poisons at their indices, and the sorted indices. The
    training set must be the one the poisons were made for: same image size, indices inside,
    and each replaced image already of the poison's class (clean label); UsageError otherwise."""
    x = np.asarray(images)
    y = np.asarray(labels)
    src = pp.source
    if tuple(x.shape[1:]) != tuple(pp.images.shape[1:]):
        raise UsageError(
            f"{src}: the poisons are {pp.images.shape[2]}x{pp.images.shape[1]} images but the "
            f"training set's are {x.shape[2]}x{x.shape[1]}: poisons made for another data set"
        )
    if pp.indices.size and pp.indices.max() >= len(x):
        raise UsageError(
            f"{src}: poison index {int(pp.indices.max())} is past the {len(x)} training images: "
            "poisons made for another data set"
        )
    wrong = np.flatnonzero(y[pp.indices] != pp.labels)
    if wrong.size:
        i = int(wrong[0])
        hint = (
            " (the authors' Bullseye Polytope indices refer to the CIFAR-10 transfer split's "
            "'others' images, saved as .npz in that order)"
            if pp.attack == "bullseye-polytope"
            else ""
        )
        raise UsageError(
            f"{src}: {wrong.size} of {pp.indices.size} poisons replace images of another class "
            f"(index {int(pp.indices[i])} is class {int(y[pp.indices[i]])}, the poison class "
            f"{int(pp.labels[i])}): poisons made for another data set or image order{hint}"
        )
    out = np.array(x)  # a writable copy (x may be a read-only memmap)
    out[pp.indices] = pp.images
    return out, np.sort(pp.indices)


def narcissus_notes(dataset: str, count: int | None, last_n: bool) -> list[str]:
    """What a Narcissus poisoning of the authors' data set ``dataset`` does that their code
    does differently, or that their code leaves open, in words (empty when it matches)."""
    a_count, a_last, where = authors_narcissus(dataset)
    notes = []
    if (count, last_n) != (a_count, a_last):
        sel = "the last of the class" if a_last else "drawn at random"
        notes.append(f"the authors poison {a_count} images of the class, {sel} ({where})")
    if dataset == "cinic10" and not last_n:
        notes.append(
            "the authors' random draw cannot be reproduced from their code (np.random.choice "
            "after np.random.seed(11) in scripts/purify.py, in their run's order), and whether "
            "their published poisons are random at all is set by purify.py's "
            "--random_imgs_narcissus (default: the last n), which nothing records; config.ini "
            "says random"
        )
    return notes


def poison_with_published(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    spec: PoisonSpec,
    source: str | None = None,
    *,
    count: int | None = 500,
    last_n: bool = True,
    seed: int = 0,
    quantize: str = "trunc",
    gm_target: str | os.PathLike[str] | None = None,
) -> PoisonedSet:
    """The training set poisoned with the authors' published ``spec`` poisons (from
    ``source``: `locate_poisons`). Narcissus poisons ``count`` images of the target class
    (`poison_dataset`; STL-10: the remapped file, resized to 96x96, as the authors); the other
    attacks replace their base images. Labels are unchanged. ``gm_target``: Gradient
    Matching's target image as ``--target-image`` gives it (`find_gm_target`; None: looked
    for as `gm_target_candidates` says, and left out when not found).
    ``extra["poisoning"]`` says in words what was done, and from which files. Bullseye
    Polytope's target image is the training set's frog that the authors take
    (`bp_target_index`), so the training set must be the transfer split's ``others``."""
    spec.check(len(class_names) if spec.attack == "narcissus" else None)
    root = locate_poisons(spec, source)
    files = [root / f for f in spec.required_files()]
    hw = (int(np.shape(images)[1]), int(np.shape(images)[2]))
    extra: dict[str, Any] = {"target_index": np.int64(spec.target), "poisons_source": str(root)}
    if spec.attack == "narcissus":
        stl = spec.dataset == "stl10"
        trig = load_narcissus(files[0], None if stl else hw)
        applied, how = trig, f"the trigger {files[0]}"
        if stl:  # utils/purification.py 102-105, 191-193
            if hw != (STL10_SIDE, STL10_SIDE):
                raise UsageError(
                    f"--poisons-dataset stl10: the authors resize the STL-10 trigger to "
                    f"{STL10_SIDE}x{STL10_SIDE}, STL-10's image size, but the training images "
                    f"are {hw[1]}x{hw[0]}; give STL-10's training set at its own size"
                )
            applied = resize_trigger(trig, STL10_SIDE)
            h, w = trig.shape[2:]
            how += (
                f" (STL-10 class {spec.target} takes CIFAR-10 class {spec.trigger_index}'s file)"
                f" resized from {w}x{h} to {STL10_SIDE}x{STL10_SIDE} (bilinear)"
            )
            extra["test_trigger"] = trig  # what the authors add at test time, not resized
        ps = poison_dataset(
            images, labels, applied, spec.target, count, class_names=class_names,
            last_n=last_n, seed=seed, quantize=quantize,
        )  # fmt: skip
        n_class = int(np.sum(np.asarray(labels) == spec.target))
        notes = narcissus_notes(spec.dataset, count, last_n)
        if stl:
            notes.append(f"at test time the authors add the file's {w}x{h} trigger, not "
                         "resized, at the top-left corner (utils/classifier.py 1150-1169)")
        extra["poisoning"] = (
            f"Narcissus: {how} added to "
            f"{describe_selection(n_class, spec.target, count, last_n, seed)}"
            + "".join(f"; {n}" for n in notes)
        )
        ps.attack = "narcissus"
        ps.extra = extra
        return ps
    if spec.attack == "gradient-matching":
        if gm_target is not None:  # given: it must be there
            gm_target = find_gm_target(spec, root, gm_target)[0]
        else:
            found = [p for p, _ in gm_target_candidates(spec, root) if p.is_file()]
            gm_target = found[0] if found else None
        pp = load_gradient_matching(files[0].parent, gm_target)
        extra["poisoning"] = (
            f"Gradient Matching trial {spec.target}: {len(pp.images)} poisons of class "
            f"{pp.poison_label} replace the training images at their indices ({files[0]}, "
            f"{files[1]}); the target image: {gm_target or 'none found'}"
        )
    else:
        pp = load_bullseye_polytope(files[0])
        t_idx = bp_target_index(labels, spec.target)
        frog = f"frog number {spec.target + BP_TARGET_SKIP + 1} (utils/classifier.py 1134)"
        if t_idx is not None:
            pp.target_image = np.array(images[t_idx])
            pp.target_label = BP_TARGET_LABEL
            extra["target_train_index"] = np.int64(t_idx)
        extra["poisoning"] = (
            f"Bullseye Polytope trial {spec.target}: {len(pp.images)} poisons of class "
            f"{pp.poison_label} replace the training images at their indices ({files[0]}); "
            "the target image: "
            + (f"training image {t_idx}, {frog}" if t_idx is not None
               else f"none ({frog}: the training set has too few frogs)")
        )  # fmt: skip
    k = len(class_names)
    if pp.poison_label >= k:
        raise UsageError(
            f"{pp.source}: the poison class {pp.poison_label} is not a class of the training set "
            f"({k} classes): poisons made for another data set"
        )
    x, idx = apply_published(images, labels, pp)
    if spec.attack == "bullseye-polytope":
        sub = bp_training_subset(labels, idx)
        extra["train_subset"] = sub
        extra["poisoning"] += (
            f"; the victims train on {sub.size} of the {len(labels)} images: the poisons and "
            f"the first {BP_PER_CLASS} other images of each class, poisons counted "
            "(utils/classifier.py 353-379)"
        )
    if pp.target_image is not None:
        extra["target_image"] = pp.target_image
        extra["target_label"] = np.int64(pp.target_label)
    return PoisonedSet(
        x, np.asarray(labels, np.int64).copy(), idx, pp.poison_label, None, list(class_names),
        attack=spec.attack, extra=extra,
    )  # fmt: skip
