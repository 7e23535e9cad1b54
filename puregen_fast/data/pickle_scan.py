"""Bounds on what a pickle asks to build, checked from its opcodes before anything is built.

Unpickling trusts the file's shape: a tuple nested 300,000 deep overflows the C stack when it
is hashed (a crash, not an exception), ten lists each holding ten references to the one below
expand to 10^10 items in any code that copies them, and a memo index of 2**32 makes the C
unpickler allocate gigabytes. `scan_pickle` reads the opcodes (`pickletools.genops`: no object
is created, no global imported, nothing hashed) and simulates the unpickler's stack with one
small record per container: its nesting depth, the items and bytes it holds with every shared
(memo) reference counted again, and whether it was already placed inside another. It refuses,
with `PickleLimitError` naming the limit:

* nesting deeper than `Budget.depth` (`MAX_PICKLE_DEPTH` by default),
* more than `Budget.items` items (`MAX_PICKLE_ITEMS`): objects pushed, and what the result
  holds with shared references counted each time (memo fan-out); memo indices past it; more
  than four opcodes per item in all; MARKs nested deeper than `Budget.depth`,
* more than `Budget.nbytes` bytes (`MAX_PICKLE_BYTES`) of strings, bytes and integers, shared
  ones counted each time, and integers over `MAX_PICKLE_INT_BYTES`,
* an object changed after it was placed inside another, or placed inside itself (a
  self-referencing structure: no file read here holds one, and it is what makes the counts
  above unbounded).

`scan_torch_file` applies it to every pickle of a ``torch.save`` file (the zip format's
``data.pkl``, or the legacy format's five pickles) and, for the zip format, refuses members
that inflate past a cap or use another compression than stored/deflate.
"""

from __future__ import annotations

import mmap
import os
import pickletools
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

__all__ = [
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_DEPTH",
    "MAX_PICKLE_INT_BYTES",
    "MAX_PICKLE_ITEMS",
    "Budget",
    "PickleLimitError",
    "check_zip",
    "read_member",
    "scan_pickle",
    "scan_torch_file",
]

# The files read here nest 5-8 levels (a list of (image, label) with the image's state; a dict
# of tensors with their storages) and push at most ~40,000 items in ~90,000 opcodes (a CIFAR-10
# batch's labels and file names); the limits leave a wide margin and keep the cost of scanning
# a refused file to about a second.
MAX_PICKLE_DEPTH = 100
MAX_PICKLE_ITEMS = 1 << 18
MAX_PICKLE_BYTES = 1 << 30
MAX_PICKLE_INT_BYTES = 256  # a LONG1 opcode's own maximum; torch's magic number is 10 bytes
_SMALL = 64  # scalars with fewer payload bytes share one record (their bytes count as 0)


class PickleLimitError(ValueError):
    """A pickle asks for more than its `Budget` (or is self-referencing); nothing was built."""


@dataclass(frozen=True)
class Budget:
    """What one pickle may build (module doc)."""

    depth: int = MAX_PICKLE_DEPTH
    items: int = MAX_PICKLE_ITEMS
    nbytes: int = MAX_PICKLE_BYTES
    int_bytes: int = MAX_PICKLE_INT_BYTES


class _Node:
    __slots__ = ("depth", "items", "nbytes", "placed", "scalar")

    def __init__(self, depth: int, items: int, nbytes: int, scalar: bool = False) -> None:
        self.depth = depth
        self.items = items
        self.nbytes = nbytes
        self.placed = False
        self.scalar = scalar


# opcodes that pop what they build from (a count, or "mark": down to the last MARK) and push
# one new object
_BUILDS = {
    "TUPLE": "mark", "LIST": "mark", "DICT": "mark", "FROZENSET": "mark", "INST": "mark",
    "OBJ": "mark", "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "REDUCE": 2, "NEWOBJ": 2,
    "NEWOBJ_EX": 3, "STACK_GLOBAL": 2, "BINPERSID": 1,
}  # fmt: skip
# opcodes that add what they pop to the object below it (a count, or "mark")
_ADDS = {"APPEND": 1, "APPENDS": "mark", "SETITEM": 2, "SETITEMS": "mark", "ADDITEMS": "mark",
         "BUILD": 1}  # fmt: skip
_CONTAINERS = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _table() -> dict[int, tuple[str, str, int, bool]]:
    """Opcode byte -> (name, how its argument is laid out, a size, signed), from pickletools."""
    out = {}
    for op in pickletools.opcodes:
        a = op.arg
        if a is None:
            kind, n = "none", 0
        elif a.n >= 0:
            kind, n = "fixed", a.n
        elif a.n == pickletools.UP_TO_NEWLINE:
            kind, n = "line", 2 if a.name.endswith("_pair") else 1
        else:  # a length prefix of 1, 4 or 8 bytes, then that many bytes
            kind = "len"
            n = {
                pickletools.TAKEN_FROM_ARGUMENT1: 1,
                pickletools.TAKEN_FROM_ARGUMENT4: 4,
                pickletools.TAKEN_FROM_ARGUMENT4U: 4,
                pickletools.TAKEN_FROM_ARGUMENT8U: 8,
            }[a.n]
        signed = a is not None and a.name in ("int4", "long4", "string4")
        out[op.code.encode("latin-1")[0]] = (op.name, kind, n, signed)
    return out


_TABLE = _table()
_INTS = {"INT", "LONG", "LONG1", "LONG4"}


def _opcodes(data: Any, pos: int, end: int, line_cap: int) -> Iterator[tuple[str, int, int, int]]:
    """(name, value, payload bytes, offset after it) per opcode from ``pos``. value: a fixed-size
    argument or a text line's integer (memo indices); payload: the bytes a string, bytes or
    integer holds. Only lengths are read, nothing is decoded (``data``: bytes or an mmap)."""
    while pos < end:
        code = data[pos]
        pos += 1
        entry = _TABLE.get(code)
        if entry is None:
            raise ValueError(f"unknown pickle opcode {code:#04x} at offset {pos - 1}")
        name, kind, n, signed = entry
        value = payload = 0
        if kind == "fixed":
            if pos + n > end:
                raise ValueError(f"{name} truncated at offset {pos - 1}")
            if name != "BINFLOAT":
                value = int.from_bytes(data[pos : pos + n], "little", signed=signed)
            pos += n
        elif kind == "len":
            if pos + n > end:
                raise ValueError(f"{name} truncated at offset {pos - 1}")
            payload = int.from_bytes(data[pos : pos + n], "little", signed=signed)
            pos += n
            if payload < 0 or payload > end - pos:
                raise ValueError(f"{name} claims {payload} bytes, {end - pos} are left")
            pos += payload
        elif kind == "line":
            for _ in range(n):
                nl = data.find(b"\n", pos, min(end, pos + line_cap + 1))
                if nl < 0:
                    raise ValueError(f"{name}: no end of line within {line_cap} bytes")
                if name in ("GET", "PUT"):  # a memo index; a long one is refused as such
                    value = int(bytes(data[pos:nl])) if nl - pos <= 12 else 1 << 62
                payload += nl - pos
                pos = nl + 1
            if name in ("INT", "LONG"):
                payload = payload * 416 // 1000 + 1  # decimal digits to bytes
        yield name, value, payload, pos
        if name == "STOP":
            return
    raise ValueError("truncated (no STOP)")


def scan_pickle(data: Any, budget: Budget = Budget(), what: str = "pickle", start: int = 0) -> int:
    """Check the pickle at offset ``start`` of ``data`` (bytes or an mmap) against ``budget``;
    returns the offset just past its STOP. PickleLimitError (naming the limit) when it asks for
    more; ValueError for a malformed opcode stream. Nothing is built."""
    stack: list[_Node] = []
    marks: list[list[_Node]] = []
    memo: dict[int, _Node] = {}
    pushed = 0
    small = _Node(1, 1, 0, scalar=True)

    def refuse(reason: str) -> PickleLimitError:
        return PickleLimitError(f"{what}: {reason}; nothing of it was built")

    def over(node: _Node) -> None:
        if node.depth > budget.depth:
            raise refuse(f"nested deeper than the limit of {budget.depth} levels (pickle depth)")
        if node.items > budget.items:
            raise refuse(
                f"holds over the limit of {budget.items} items (pickle items; each shared "
                "reference counted again)"
            )
        if node.nbytes > budget.nbytes:
            raise refuse(
                f"holds over the limit of {budget.nbytes} bytes (pickle bytes; each shared "
                "reference counted again)"
            )

    def push(node: _Node) -> None:
        nonlocal pushed
        pushed += 1
        if pushed > budget.items:
            raise refuse(f"pushes over the limit of {budget.items} items (pickle items)")
        stack.append(node)

    def pop_mark() -> list[_Node]:
        nonlocal stack
        if not marks:
            raise ValueError(f"{what}: an opcode needs a MARK that is not there")
        items, stack = stack, marks.pop()
        return items

    def pop(n: int) -> list[_Node]:
        if len(stack) < n:
            raise ValueError(f"{what}: stack underflow")
        items = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return items

    def place(children: list[_Node], into: _Node) -> None:
        depth, items, nbytes = into.depth, into.items, into.nbytes
        for c in children:
            if c is small:  # most children: a scalar with no bytes counted (depth 1)
                items += 1
                depth = depth if depth >= 2 else 2
                continue
            if c is into:
                raise refuse("holds itself (a self-referencing structure)")
            c.placed = True
            if c.depth >= depth:
                depth = c.depth + 1
            items += c.items
            nbytes += c.nbytes
        into.depth, into.items, into.nbytes = depth, items, nbytes
        over(into)

    end = len(data)
    ops = 0
    for name, value, payload, pos in _opcodes(data, start, end, budget.nbytes):
        ops += 1
        if ops > 4 * budget.items:
            raise refuse(f"over {4 * budget.items} opcodes (4 x the limit on pickle items)")
        if name in _BUILDS:
            n = _BUILDS[name]
            children = pop_mark() if n == "mark" else pop(n)
            node = _Node(1, 1, 0)
            place(children, node)
            push(node)
        elif name in _ADDS:
            n = _ADDS[name]
            children = pop_mark() if n == "mark" else pop(n)
            if not stack:
                raise ValueError(f"{what}: {name} with nothing to add to")
            target = stack[-1]
            if target.scalar:
                raise ValueError(f"{what}: {name} on an object that cannot hold items")
            if target.placed:
                raise refuse(
                    "changes an object after placing it inside another (a self-referencing "
                    "structure)"
                )
            place(children, target)
        elif name in _MEMO_GET:
            if value not in memo:
                raise ValueError(f"{what}: memo entry {value} read before it is written")
            push(memo[value])
        elif name in _MEMO_PUT or name == "MEMOIZE":
            idx = len(memo) if name == "MEMOIZE" else value
            if not 0 <= idx < budget.items:
                raise refuse(f"memo index {idx} is past the limit of {budget.items} (pickle items)")
            if not stack:
                raise ValueError(f"{what}: {name} with an empty stack")
            memo[idx] = stack[-1]
        elif name == "MARK":  # the stack so far is set aside, as the unpickler does
            if len(marks) >= budget.depth:
                raise refuse(f"MARKs nested deeper than the limit of {budget.depth} (pickle depth)")
            push(small)  # counted as an item, like a push
            stack.pop()
            marks.append(stack)
            stack = []
        elif name == "POP":
            if stack:
                stack.pop()
            else:
                pop_mark()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            if not stack:
                raise ValueError(f"{what}: DUP with an empty stack")
            push(stack[-1])
        elif name == "READONLY_BUFFER":
            pop(1)
            push(small)
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise ValueError(f"{what}: STOP with {len(stack)} objects on the stack")
            return pos
        elif name in ("PROTO", "FRAME"):
            continue
        elif name in _CONTAINERS:
            push(_Node(1, 1, 0))
        else:  # an opcode that pushes one object made from its argument alone
            if name in _INTS and payload > budget.int_bytes:
                raise refuse(
                    f"an integer of {payload} bytes, over the limit of {budget.int_bytes} "
                    "(pickle integer)"
                )
            if payload < _SMALL:
                push(small)
            else:
                node = _Node(1, 1, payload, scalar=True)
                over(node)
                push(node)
    raise ValueError(f"{what}: truncated (no STOP)")  # pragma: no cover - _opcodes raises


# ----------------------------------------------------------------------------- torch.save files

# torch.serialization's legacy format: the magic number and protocol pickles, then sys_info,
# the object, the storage keys; then the storages' raw bytes
_LEGACY_PICKLES = 5


def scan_torch_file(
    path: str | os.PathLike[str], budget: Budget = Budget(), max_inflated: int = 1 << 30
) -> None:
    """Check every pickle of a ``torch.save`` file at ``path`` against ``budget`` before torch
    reads it; for the zip format also the members: stored or deflate, and at most
    ``max_inflated`` bytes in all, declared. PickleLimitError or ValueError; OSError."""
    with open(path, "rb") as f:
        # torch decides as here, from the first four bytes: a legacy file with a zip appended
        # is read as legacy (zipfile.is_zipfile would look at the zip)
        if f.read(4) == b"PK\x03\x04":
            f.seek(0)
            z, name = check_zip(f, max_inflated)
            with z:
                scan_pickle(read_member(z, name, budget.nbytes), budget, what="data.pkl")
            return
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("an empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            pos = 0
            for i in range(_LEGACY_PICKLES):
                pos = scan_pickle(data, budget, f"pickle {i + 1} of {_LEGACY_PICKLES}", pos)


def check_zip(
    f: IO[bytes], max_inflated: int, max_members: int = 1 << 14
) -> tuple[zipfile.ZipFile, str]:
    """A torch zip file opened, and the name of its ``data.pkl``, after its directory is checked:
    at most ``max_members`` members (counted from the end record, before the directory is
    parsed: each member costs memory), stored or deflate, and at most ``max_inflated`` bytes
    declared in all. ValueError (PickleLimitError for a limit); reading a member must still cap
    what it inflates to (`read_member`)."""
    try:
        return _check_zip(f, max_inflated, max_members)
    except _ZIP_ERRORS as e:
        raise ValueError(f"a corrupt zip file ({type(e).__name__}: {str(e)[:200]})") from e


# what zipfile and zlib raise on a damaged file, beside ValueError and OSError
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError)


def _check_zip(f: IO[bytes], max_inflated: int, max_members: int) -> tuple[zipfile.ZipFile, str]:
    end = zipfile._EndRecData(f)  # the end record alone: the directory is not parsed yet
    if end is None:
        raise ValueError("not a zip file")
    count, cd_size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if count > max_members or cd_size > max_members * 1024:
        raise PickleLimitError(
            f"a zip directory of {count} members ({cd_size} bytes), over the limit of "
            f"{max_members} members (zip members)"
        )
    z = zipfile.ZipFile(f)
    try:
        infos = z.infolist()
        if not infos or len(infos) > max_members:
            raise PickleLimitError(f"{len(infos)} zip members: 1 to {max_members} (zip members)")
        total = 0
        for info in infos:
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"a member compressed with method {int(info.compress_type)}")
            total += info.file_size
            if total > max_inflated:
                raise PickleLimitError(
                    f"its members inflate to over the limit of {max_inflated} bytes (zip "
                    "inflated bytes)"
                )
        if len(z.NameToInfo) != len(infos):  # readers differ on which one of a name they take
            raise ValueError("a zip file with two members of one name")
        name = f"{infos[0].filename.split('/', 1)[0]}/data.pkl"
        if name not in z.NameToInfo:
            raise ValueError("a zip file without data.pkl (not written by torch.save)")
    except BaseException:
        z.close()
        raise
    return z, name


def read_member(z: zipfile.ZipFile, name: str, cap: int) -> bytes:
    """A member's bytes, inflating at most ``cap`` bytes (and no more than it declares)."""
    info = z.getinfo(name)
    if info.file_size > cap:
        raise PickleLimitError(
            f"member {name[-40:]!r} declares {info.file_size} bytes, over the limit of {cap} "
            "(zip inflated bytes)"
        )
    try:
        with z.open(info) as m:
            data = m.read(cap + 1)  # zipfile stops at the declared size and checks the CRC
    except _ZIP_ERRORS as e:  # a bad CRC or local header, a broken deflate stream
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise ValueError(f"member {name[-40:]!r} is corrupt ({why})") from e
    if len(data) != info.file_size:
        raise ValueError(f"member {name[-40:]!r} inflates to another size than it declares")
    return data
