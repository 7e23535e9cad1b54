"""Generated poison files for the fuzz test (issue 22): Gradient Matching pickles, Bullseye
Polytope ``.pth`` files (zip and legacy) and Narcissus ``.npy`` triggers, built from trees that
mix plausible content (images, arrays, tensors, labels, indices) with deep nesting, memo
sharing and fan-out, huge claimed lengths, sizes and integers, refused globals, truncation and
flipped bytes. `fuzz_main` runs in the child process of `poison_cases` (a memory cap and a
deadline per case) and counts outcomes: loaded, clean errors (UsageError), other exceptions,
hangs.
"""

from __future__ import annotations

import signal
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import poison_cases as C
from helpers import budget_spent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

GLOBALS = [
    ("builtins", "frozenset"), ("builtins", "set"), ("collections", "OrderedDict"),
    ("_codecs", "encode"), ("numpy", "dtype"), ("PIL.Image", "Image"),
    ("copyreg", "_reconstructor"), ("builtins", "object"), ("torch", "FloatStorage"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "_load_from_bytes"),
    ("os", "system"), ("builtins", "eval"), ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._utils", "_rebuild_meta_tensor_no_storage"), ("numpy.core.multiarray", "scalar"),
]  # fmt: skip
HUGE = [2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1]
DTYPES = ["<i8", "<f4", "<u1", ">f8", "|b1", "<c8", "|O", "<f2"]

_ints = st.one_of(
    st.integers(-5, 300), st.integers(-(2**40), 2**40), st.sampled_from(HUGE + [2**70, -(2**70)])
)
_sizes = st.one_of(st.integers(0, 8), st.sampled_from(HUGE))
_leaves = st.one_of(
    st.tuples(st.just("int"), _ints),
    st.tuples(st.just("bigint"), st.sampled_from([300, 5000, 1 << 20])),  # bytes of integer
    st.tuples(st.just("bytes"), st.integers(0, 80), st.sampled_from([None] * 6 + HUGE)),
    st.tuples(st.just("bigbytes"), st.sampled_from([1 << 16, 1 << 20, 3 << 20])),
    st.tuples(st.just("str"), st.text(max_size=8)),
    st.just(("none",)),
    st.tuples(st.just("ref"), st.integers(0, 60)),
    st.tuples(
        st.just("deep"),
        st.sampled_from(["tuple", "list", "frozenset", "dict"]),
        st.sampled_from([3, 99, 100, 101, 5000, 100_000]),
    ),  # fmt: skip
    st.tuples(st.just("fanout"), st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.just("global"), st.sampled_from(GLOBALS)),
    st.tuples(
        st.just("image_ok"),
        st.integers(1, 40),
        st.integers(1, 40),
        st.sampled_from(["RGB", "L", "RGBA"]),
    ),  # fmt: skip
)
TREE = st.recursive(
    _leaves,
    lambda ch: st.one_of(
        st.tuples(
            st.sampled_from(["list", "tuple", "dict", "frozenset", "set"]), st.lists(ch, max_size=5)
        ),  # fmt: skip
        st.tuples(st.just("memo"), ch),
        st.tuples(st.just("image"), ch, ch, ch),
        st.tuples(
            st.just("ndarray"),
            st.lists(_sizes, max_size=9),
            st.sampled_from(DTYPES),
            st.integers(0, 300),
        ),  # fmt: skip
        st.tuples(
            st.just("tensor"),
            _sizes,
            st.integers(0, 64),
            st.lists(_sizes, max_size=9),
            st.lists(_sizes, max_size=9),
            _sizes,
        ),  # fmt: skip
        st.tuples(st.just("reduce"), st.sampled_from(GLOBALS), st.lists(ch, max_size=3)),
        st.tuples(st.just("build"), ch, ch),
    ),
    max_leaves=24,
)


class _Compiler:
    """A recipe tree to pickle opcodes; memo entries only through MEMOIZE, so references can
    name any entry made so far."""

    def __init__(self, storage_pids: bool = False) -> None:
        self.memo = 0
        self.pids = storage_pids  # tensors by persistent id (a .pth), else by _load_from_bytes
        self.storages: dict[str, bytes] = {}

    def ref(self, k: int) -> bytes:
        return b"j" + struct.pack("<I", k % self.memo) if self.memo else b"N"

    def memoize(self) -> bytes:
        self.memo += 1
        return C.MEMOIZE

    def __call__(self, node: tuple) -> bytes:  # noqa: C901 - one branch per kind
        kind = node[0]
        if kind == "int":
            return C.p_int(node[1])
        if kind == "bigint":
            return C.p_int(1 << (8 * node[1] - 2))
        if kind == "bytes":
            return C.p_bytes(bytes(node[1]), claim=node[2])
        if kind == "bigbytes":
            return C.p_bytes(bytes(node[1])) + self.memoize()
        if kind == "str":
            return C.p_str(node[1])
        if kind == "none":
            return b"N"
        if kind == "ref":
            return self.ref(node[1])
        if kind == "deep":
            inner = C.deep_tuple(node[2])
            if node[1] == "list":
                return b"](" * node[2] + b"e" * node[2]
            if node[1] == "frozenset":
                return C.p_call(C.p_global("builtins", "frozenset"), [C.p_list([inner])])
            if node[1] == "dict":
                return b"}" + inner + b"Ns"
            return inner
        if kind == "fanout":
            levels, refs = node[1], node[2]
            first = self.memo
            out = b"]" + self.memoize() + b"0"
            for i in range(levels):
                idx = struct.pack("<I", first + i)
                out += b"](" + (b"j" + idx) * refs + b"e" + self.memoize() + b"0"
            return out + b"j" + struct.pack("<I", first + levels)
        if kind == "global":
            return C.p_global(*node[1])
        if kind == "image_ok":
            w, h, mode = node[1], node[2], node[3]
            ch = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
            size = C.p_tuple([C.p_int(w), C.p_int(h)])
            return C.p_image(C.p_str(mode), size, C.p_bytes(bytes(w * h * ch)))
        if kind in ("list", "tuple", "set", "frozenset"):
            items = [self(c) for c in node[1]]
            if kind == "list":
                return C.p_list(items)
            if kind == "tuple":
                return C.p_tuple(items)
            if kind == "set":
                return b"\x8f(" + b"".join(items) + b"\x90"
            return b"(" + b"".join(items) + b"\x91"
        if kind == "dict":
            items = [self(c) for c in node[1]]
            return C.p_dict(list(zip(items[::2], items[1::2])))
        if kind == "memo":
            return self(node[1]) + self.memoize()
        if kind == "image":
            return C.p_image(self(node[1]), self(node[2]), self(node[3]))
        if kind == "ndarray":
            shape = C.p_tuple([C.p_int(v) for v in node[1]])
            return C.p_ndarray(shape, C.p_bytes(bytes(node[3])), node[2])
        if kind == "tensor":
            numel, n, size, stride, offset = node[1:]
            if self.pids:
                key = str(len(self.storages))
                self.storages[key] = bytes(4 * n)
                storage = C.p_pid(key, numel)
            else:
                legacy = C.legacy_torch(
                    C.wrap(C.p_pid("0", numel, "FloatStorage", legacy=True), 2),
                    ["0"],
                    [(numel, bytes(4 * n))],
                )
                storage = C.p_call(C.p_global("torch.storage", "_load_from_bytes"),
                                   [C.p_bytes(legacy)])  # fmt: skip
            return C.p_tensor(storage, size, stride, offset)
        if kind == "reduce":
            return C.p_call(C.p_global(*node[1]), [self(c) for c in node[2]])
        if kind == "build":
            return self(node[1]) + self(node[2]) + b"b"
        raise AssertionError(kind)


def _damage(data: bytes, how: tuple[str, int, int]) -> bytes:
    kind, at, value = how
    if kind == "none" or not data:
        return data
    at %= len(data)
    if kind == "cut":
        return data[:at]
    return data[:at] + bytes([value]) + data[at + 1 :]


DAMAGE = st.one_of(
    st.just(("none", 0, 0)),
    st.just(("none", 0, 0)),
    st.tuples(st.sampled_from(["cut", "flip"]), st.integers(0, 2**20), st.integers(0, 255)),
)


# ----------------------------------------------------------------------------- the formats

GM_POISONS = st.one_of(
    TREE,
    st.tuples(st.just("list"), st.lists(st.tuples(st.just("tuple"), st.tuples(
        st.one_of(st.tuples(st.just("image_ok"), st.just(4), st.just(4), st.just("RGB")), TREE),
        st.one_of(st.tuples(st.just("int"), _ints), TREE))), min_size=1, max_size=6)),
)  # fmt: skip
GM_INDICES = st.one_of(
    TREE,
    st.tuples(st.just("list"), st.lists(st.tuples(st.just("int"), _ints), max_size=6)),
    st.tuples(
        st.just("ndarray"), st.lists(_sizes, max_size=2), st.just("<i8"), st.integers(0, 64)
    ),  # fmt: skip
    st.tuples(
        st.just("tensor"),
        _sizes,
        st.integers(0, 8),
        st.lists(_sizes, max_size=2),
        st.lists(_sizes, max_size=2),
        _sizes,
    ),  # fmt: skip
)


@st.composite
def _plausible_gm(draw) -> tuple[tuple, tuple]:
    """A file as published (n images of one size, labels, n distinct indices), for the damage
    and the odd value to act on."""
    n, side = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    label = draw(st.one_of(st.integers(0, 9), _ints))
    pairs = [("tuple", [("image_ok", side, side, "RGB"), ("int", label)]) for _ in range(n)]
    idx = draw(st.lists(st.one_of(st.integers(0, 10**6), _ints), min_size=n, max_size=n,
                        unique=True))  # fmt: skip
    return ("list", pairs), ("list", [("int", i) for i in idx])


@st.composite
def gm_case(draw) -> dict[str, bytes]:
    files = {}
    poisons, indices = draw(_plausible_gm())
    plausible = draw(st.integers(0, 2)) > 0  # else any tree, and damage more often
    damage = st.one_of(st.just(("none", 0, 0)), DAMAGE) if plausible else DAMAGE
    for name, strategy in (("poisons.pickle", GM_POISONS), ("base_indices.pickle", GM_INDICES)):
        if plausible:
            strategy = st.just(poisons if name == "poisons.pickle" else indices)
        comp = _Compiler()
        files[name] = _damage(C.wrap(comp(draw(strategy)), draw(st.sampled_from([2, 4]))),
                              draw(damage))  # fmt: skip
    if draw(st.booleans()):
        target = ("tuple", [("image_ok", 3, 3, "RGB"), ("int", 1)]) if plausible else draw(TREE)
        files["target.pickle"] = C.wrap(_Compiler()(target))
    return files


BP_IMAGE = st.tuples(st.just("tensor"), _sizes, st.integers(0, 3 * 64), st.one_of(
    st.just([3, 8, 8]), st.lists(_sizes, max_size=5)), st.one_of(
    st.just([64, 8, 1]), st.lists(_sizes, max_size=5)), _sizes)  # fmt: skip


@st.composite
def bp_case(draw) -> dict[str, bytes]:
    comp = _Compiler(storage_pids=True)
    shape = draw(st.integers(0, 3))
    if shape == 0:
        pkl = C.wrap(comp(draw(TREE)), 2)
    elif shape == 1:  # as published: n (3, 8, 8) images, labels, n distinct indices
        n = draw(st.integers(1, 4))
        images = [comp(("tensor", 192, 192, [3, 8, 8], [64, 8, 1], 0)) for _ in range(n)]
        labels = [C.p_int(draw(st.one_of(st.integers(0, 9), _ints)))] * n
        idx = draw(st.lists(st.one_of(st.integers(0, 10**6), _ints), min_size=n, max_size=n,
                            unique=True))  # fmt: skip
        pkl = C.bp_pickle(images, labels, C.p_list([C.p_int(i) for i in idx]))
    else:
        n = draw(st.integers(1, 4))
        images = [comp(draw(st.one_of(BP_IMAGE, BP_IMAGE, TREE))) for _ in range(n)]
        labels = [C.p_int(draw(_ints)) for _ in range(n)]
        idx = comp(draw(GM_INDICES))
        pkl = C.bp_pickle(images, labels, idx)
    storages = comp.storages
    fmt = draw(st.sampled_from(["zip", "zip", "deflate", "legacy"]))
    if fmt == "legacy":
        data = C.legacy_torch(pkl, list(storages), [(len(v) // 4, v) for v in storages.values()])
    else:
        declared = {}
        if storages and draw(st.booleans()):
            declared[draw(st.sampled_from(sorted(storages)))] = draw(_sizes) % 2**32
        data = C.torch_zip(pkl, storages, deflate=fmt == "deflate", declared=declared)
    return {"poison_00799.pth": _damage(data, draw(DAMAGE))}


_DESCR = st.sampled_from(["<f4", "<f8", ">f4", "<f2", "|O", "<i4", "V8", "[('a', '<f4')]", "?"])
_SHAPE = st.one_of(
    st.just("(1, 3, 4, 4)"), st.just("(3, 4, 4)"),
    st.lists(st.sampled_from([-1, 0, 1, 3, 4, 1024, 1025] + HUGE), max_size=5).map(
        lambda v: "(" + "".join(f"{x}, " for x in v) + ")"),
    st.sampled_from(["(" * 300 + ")" * 300, "[1, 3, 4, 4]", "'x'", "(1.5, 3)", "()"]),
)  # fmt: skip


@st.composite
def narcissus_case(draw) -> dict[str, bytes]:
    header = (
        f"{{'descr': {draw(_DESCR)!r}, 'fortran_order': {draw(st.booleans())}, "
        f"'shape': {draw(_SHAPE)}, }}"
    ).replace("\"[('a', '<f4')]\"", "[('a', '<f4')]")
    version = draw(st.sampled_from([(1, 0), (1, 0), (2, 0), (3, 0), (9, 9)]))
    data = bytes(draw(st.sampled_from([0, 4, 192, 4 * 48, 8 * 48, 5000])))
    out = C.npy(header, data, version)
    if draw(st.integers(0, 4)) == 0:  # a header length that claims more than the file holds
        size = draw(st.sampled_from([0, 9999, 10001, 65535, 2**32 - 1]))
        head = struct.pack("<H", size % 65536) if version[0] == 1 else struct.pack("<I", size)
        out = out[:8] + head + out[8 + len(head) :]
    return {"best_noise_lab0.npy": _damage(out, draw(DAMAGE))}


FORMATS = {"gm": gm_case(), "bp": bp_case(), "narcissus": narcissus_case()}


# ----------------------------------------------------------------------------- the child's loop


def fuzz_main(spec: dict) -> list[dict]:
    """For each format of ``spec["fuzz"]["formats"]``, ``spec["fuzz"]["cases"]`` generated
    files, each loaded with a deadline: counts, and the first messages of anything but a clean
    outcome."""
    return [_fuzz_one(fmt, spec) for fmt in spec["fuzz"]["formats"]]


def _fuzz_one(fmt: str, spec: dict) -> dict:
    cases, deadline = spec["fuzz"]["cases"], spec["deadline_s"]
    counts: Counter = Counter()
    others: list[str] = []
    worst = {"s": 0.0}
    root = Path(tempfile.mkdtemp(prefix="poison-fuzz-"))

    def alarm(signum, frame):
        raise C._Deadline()

    signal.signal(signal.SIGALRM, alarm)

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=spec["fuzz"].get("derandomize", False),
        suppress_health_check=list(HealthCheck),
    )
    @given(files=FORMATS[fmt])
    def one(files: dict[str, bytes]) -> None:
        if budget_spent():
            return
        d = root / str(counts["cases"])
        C.write_case(d, files)
        counts["cases"] += 1
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, deadline)
        try:
            out = C.load_case(fmt, d)
        except C._Deadline:
            out = "hang"
        except BaseException as e:  # noqa: BLE001 - counted, the test fails on any
            out = f"other: {type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        worst["s"] = max(worst["s"], time.monotonic() - t0)
        key = "ok" if out == "ok" else "clean" if out.startswith("usage: ") else out[:5]
        counts[key] += 1
        if key not in ("ok", "clean") and len(others) < 10:
            others.append(out)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()

    one()
    return {
        "format": fmt,
        "counts": dict(counts),
        "others": others,
        "slowest_s": round(worst["s"], 3),
        "peak_rss_mib": C.peak_rss_mib(),
    }
