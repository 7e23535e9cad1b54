"""Hostile poison files, written opcode by opcode, and a runner that loads them in a child
process under a deadline and a memory cap (a crash or a hang there fails the test, not the
whole run).

`hostile_cases` builds the files of issue 22 (nesting that overflows the C stack, memo fan-out,
huge claimed sizes, shared pixel buffers, expanded tensors, zip inflation, out-of-range
indices, meta and sparse tensors). The strategies at the bottom generate more of the same
shape for the fuzz test. ``python poison_cases.py RUN.json`` loads each case listed in RUN.json
and prints one JSON line of results.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import struct
import sys
import time
import zipfile
from pathlib import Path

from peak_rss import peak_rss_mib

# ----------------------------------------------------------------------------- opcode assembly

MEMOIZE = b"\x94"
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def p_bytes(b: bytes, claim: int | None = None) -> bytes:
    n = len(b) if claim is None else claim
    if n < 256:
        return b"C" + bytes([n]) + b
    if n < 2**32:
        return b"B" + struct.pack("<I", n) + b
    return b"\x8e" + struct.pack("<Q", n) + b


def p_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def p_list(items: list[bytes]) -> bytes:
    return b"](" + b"".join(items) + b"e" if items else b"]"


def p_dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b"}"


def p_call(func: bytes, args: list[bytes]) -> bytes:
    return func + p_tuple(args) + b"R"


def wrap(body: bytes, proto: int = 4) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def p_image(mode: bytes, size: bytes, data: bytes, info: bytes = b"}", palette: bytes = b"N"):
    """A PIL image as pickle writes it: the class, then BUILD with [info, mode, size, pal, data]."""
    return (
        p_global("PIL.Image", "Image") + b")\x81" + p_list([info, mode, size, palette, data]) + b"b"
    )


def p_dtype(spec: str = "<i8") -> bytes:
    d = p_call(p_global("numpy", "dtype"), [p_str(spec[1:]), b"\x89", b"\x88"])
    state = p_tuple([p_int(3), p_str(spec[0]), b"N", b"N", b"N", p_int(-1), p_int(-1), p_int(0)])
    return d + state + b"b"


def p_ndarray(shape: bytes, raw: bytes, dtype: str = "<i8") -> bytes:
    recon = p_call(
        p_global("numpy.core.multiarray", "_reconstruct"),
        [p_global("numpy", "ndarray"), p_tuple([p_int(0)]), p_bytes(b"b")],
    )
    return recon + p_tuple([p_int(1), shape, p_dtype(dtype), b"\x89", raw]) + b"b"


def p_pid(key: str, numel: int, kind: str = "FloatStorage", legacy: bool = False) -> bytes:
    items = [p_str("storage"), p_global("torch", kind), p_str(key), p_str("cpu"), p_int(numel)]
    return p_tuple(items + ([b"N"] if legacy else [])) + b"Q"


def p_tensor(storage: bytes, size: list[int], stride: list[int], offset: int = 0) -> bytes:
    od = p_call(p_global("collections", "OrderedDict"), [])
    return p_call(
        p_global("torch._utils", "_rebuild_tensor_v2"),
        [storage, p_int(offset), p_tuple([p_int(v) for v in size]),
         p_tuple([p_int(v) for v in stride]), b"\x89", od],
    )  # fmt: skip


def legacy_torch(main: bytes, keys: list[str], raws: list[tuple[int, bytes]]) -> bytes:
    """torch's legacy format: magic, protocol, sys_info, ``main`` (a pickle), the keys, then
    each storage's element count and bytes."""
    info = p_dict([(p_str("protocol_version"), p_int(1001)), (p_str("little_endian"), b"\x88")])
    out = wrap(p_int(LEGACY_MAGIC), 2) + wrap(p_int(1001), 2) + wrap(info, 2) + main
    out += wrap(p_list([p_str(k) for k in keys]), 2)
    for numel, raw in raws:
        out += struct.pack("<q", numel) + raw
    return out


def torch_zip(
    pkl: bytes,
    storages: dict[str, bytes],
    *,
    deflate: bool = False,
    declared: dict[str, int] | None = None,
) -> bytes:
    """A torch zip file; ``declared`` overrides a member's declared size in its headers."""
    buf = io.BytesIO()
    kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", kind) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", b"3\n")
    data = buf.getvalue()
    for key, size in (declared or {}).items():
        data = _patch_size(data, f"archive/data/{key}", size)
    return data


def _patch_size(data: bytes, name: str, size: int) -> bytes:
    """``name``'s uncompressed size set to ``size`` in its local and central headers."""
    out, raw = bytearray(data), name.encode()
    # (signature, offset of the name length, of the name, of the uncompressed size)
    for sig, len_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        at = out.find(sig)
        while at >= 0:
            n = struct.unpack_from("<H", out, at + len_at)[0]
            if out[at + name_at : at + name_at + n] == raw:
                struct.pack_into("<I", out, at + size_at, size)
            at = out.find(sig, at + 4)
    return bytes(out)


def bp_pickle(images: list[bytes], labels: list[bytes], idx: bytes) -> bytes:
    pairs = [p_tuple([t, lab]) for t, lab in zip(images, labels)]
    return wrap(p_dict([(p_str("poison"), p_list(pairs)), (p_str("idx"), idx)]), 2)


def good_bp_image(key: str, side: int = 8) -> tuple[bytes, bytes]:
    n = 3 * side * side
    return p_tensor(p_pid(key, n), [3, side, side], [side * side, side, 1]), struct.pack(
        f"<{n}f", *([0.1] * n)
    )


def npy(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    h = header.encode("latin-1")
    pad = 64 - (10 + len(h) + 1) % 64
    h = h + b" " * (pad % 64) + b"\n"
    size = struct.pack("<H", len(h)) if version[0] == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes(version) + size + h + data


# ----------------------------------------------------------------------------- issue 22's files


def deep_tuple(n: int) -> bytes:
    return b")" + b"\x85" * n


def fanout(levels: int, refs: int) -> bytes:
    """``levels`` lists, each holding ``refs`` memo references to the one below (235 bytes for
    10 x 10, 10**10 items when expanded)."""
    out = b"]" + MEMOIZE + b"0"  # each list memoized, popped, then referenced
    for i in range(levels):
        out += b"](" + (b"h" + bytes([i])) * refs + b"e" + MEMOIZE + b"0"
    return out + b"h" + bytes([levels])


def hostile_cases() -> dict[str, tuple[str, dict[str, bytes]]]:
    """name -> (loader, {file name: bytes}); loader "gm", "bp" or "narcissus"."""
    good_img = p_image(p_str("RGB"), p_tuple([p_int(2), p_int(2)]), p_bytes(bytes(12)))
    good_list = wrap(p_list([p_tuple([good_img, p_int(1)])]))
    good_idx = wrap(p_list([p_int(3)]))
    cases: dict[str, tuple[str, dict[str, bytes]]] = {}

    def gm(name: str, poisons: bytes = good_list, base: bytes = good_idx) -> None:
        cases[name] = ("gm", {"poisons.pickle": poisons, "base_indices.pickle": base})

    deep = deep_tuple(300_000)
    gm("deep tuple dict key", wrap(b"}" + deep + p_int(1) + b"s", 2))
    gm("deep tuple in frozenset", wrap(p_call(p_global("builtins", "frozenset"),
                                              [p_list([deep])]), 2))  # fmt: skip
    gm("deep list", wrap(b"](" * 200_000 + b"e" * 200_000))
    gm("memo fan-out 10x10", wrap(fanout(10, 10)))
    shared = fanout(10, 10)  # the whole structure as an image's mode, and as an encoding
    gm("fan-out as image mode", wrap(p_list([p_tuple([p_image(
        shared, p_tuple([p_int(2), p_int(2)]), p_bytes(bytes(12))), p_int(1)])])))  # fmt: skip
    gm("fan-out as codecs encoding", wrap(p_call(p_global("_codecs", "encode"),
                                                 [p_str("x"), shared])))  # fmt: skip
    big = p_int(1 << (8 * (1 << 20))) + MEMOIZE  # a 1 MiB integer, then 199 references to it
    shape = b"(" + big + b"h\x00" * 199 + b"t"
    gm("shape of 200 huge ints", base=wrap(p_ndarray(shape, p_bytes(b""))))
    shape2 = p_tuple([p_int(2**40)] * 8)
    gm("shape of 8 x 2**40", base=wrap(p_ndarray(shape2, p_bytes(bytes(8)))))
    px = p_bytes(bytes(3 << 20)) + MEMOIZE  # 3 MB of pixels, 400 images pointing at it
    size = p_tuple([p_int(1024), p_int(1024)])
    imgs = [p_tuple([p_image(p_str("RGB"), size, px if i == 0 else b"h\x00"), p_int(1)])
            for i in range(400)]  # fmt: skip
    gm("one pixel buffer in 400 images", wrap(p_list(imgs)))
    one = legacy_torch(wrap(p_pid("0", 1, "LongStorage", legacy=True), 2), ["0"],
                       [(1, bytes(8))])  # fmt: skip
    storage = p_call(p_global("torch.storage", "_load_from_bytes"), [p_bytes(one)])
    gm("expanded tensor as indices", base=wrap(p_tensor(storage, [2**31], [0])))
    gm("storage claiming 2**40 elements", base=wrap(p_tensor(p_call(
        p_global("torch.storage", "_load_from_bytes"),
        [p_bytes(legacy_torch(wrap(p_pid("0", 2**40, "LongStorage", legacy=True), 2), ["0"],
                              [(2**40, bytes(8))]))]), [1], [1])))  # fmt: skip
    gm("memo index 2**32-1", wrap(b"]r\xff\xff\xff\xff"))
    gm("bytes claiming 2**62", wrap(p_bytes(b"abc", claim=2**62)))
    gm("self-referencing list", wrap(b"]" + MEMOIZE + b"h\x00a"))
    gm("index 2**70", base=wrap(p_list([p_int(2**70)])))

    def bp(name: str, data: bytes) -> None:
        cases[name] = ("bp", {"poison_00799.pth": data})

    img, raw = good_bp_image("0")
    ok_idx = p_list([p_int(3)])
    bp("bp deep tuple", torch_zip(wrap(b"}" + deep + p_int(1) + b"s", 2), {}))
    bp("bp memo fan-out", torch_zip(wrap(fanout(10, 10), 2), {}))
    bp("bp index 2**70", torch_zip(bp_pickle([img], [p_int(1)], p_list([p_int(2**70)])),
                                   {"0": raw}))  # fmt: skip
    bp("bp label 2**70", torch_zip(bp_pickle([img], [p_int(2**70)], ok_idx), {"0": raw}))
    bp("bp negative label", torch_zip(bp_pickle([img], [p_int(-1)], ok_idx), {"0": raw}))
    idx_t = p_tensor(p_pid("1", 1, "LongStorage"), [2**40], [0])
    bp("bp expanded idx", torch_zip(bp_pickle([img], [p_int(1)], idx_t),
                                    {"0": raw, "1": bytes(8)}))  # fmt: skip
    meta = p_call(p_global("torch._utils", "_rebuild_meta_tensor_no_storage"),
                  [p_global("torch", "float32"), p_tuple([p_int(3), p_int(8), p_int(8)]),
                   p_tuple([p_int(64), p_int(8), p_int(1)]), b"\x89"])  # fmt: skip
    bp("bp meta image", torch_zip(bp_pickle([meta], [p_int(1)], ok_idx), {}))
    sparse = p_call(p_global("torch._utils", "_rebuild_sparse_tensor"),
                    [p_global("torch", "sparse_coo"), p_tuple([p_int(3), p_int(8), p_int(8)]),
                     p_tuple([img, img]), p_tuple([])])  # fmt: skip
    bp("bp sparse image", torch_zip(bp_pickle([sparse], [p_int(1)], ok_idx), {"0": raw}))
    # a deflated storage declaring 300 MB (a real one: `zip_bomb`, about 0.3 MB of file)
    bp("bp inflates to 300 MB", torch_zip(bp_pickle([img], [p_int(1)], ok_idx), {"0": raw},
                                          deflate=True, declared={"0": 300 << 20}))  # fmt: skip
    bp("bp declares less than it inflates", torch_zip(
        bp_pickle([img], [p_int(1)], ok_idx), {"0": raw + bytes(1 << 20)}, deflate=True,
        declared={"0": len(raw)}))  # fmt: skip
    bp("bp storage claims 2**40 elements", torch_zip(bp_pickle(
        [p_tensor(p_pid("0", 2**40), [3, 8, 8], [64, 8, 1])], [p_int(1)], ok_idx),
        {"0": raw}))  # fmt: skip
    bp("bp legacy format, huge claim", legacy_torch(
        bp_pickle([p_tensor(p_pid("0", 2**40, legacy=True), [3, 8, 8], [64, 8, 1])],
                  [p_int(1)], ok_idx), ["0"], [(2**40, raw)]))  # fmt: skip

    def narc(name: str, data: bytes) -> None:
        cases[name] = ("narcissus", {"best_noise_lab0.npy": data})

    narc("npy deep header", npy("{'descr': '<f4', 'fortran_order': False, 'shape': "
                                + "(" * 3000 + ")" * 3000 + "}"))  # fmt: skip
    narc("npy huge shape", npy("{'descr': '<f4', 'fortran_order': False, "
                               "'shape': (1, 3, 2147483647, 2147483647), }"))  # fmt: skip
    # numpy's header parser lets tokenize's TokenError out (found by the fuzz)
    narc("npy unbalanced header", npy("{'descr': '<f4', 'fortran_order': False, "
                                      "'shape': (1, 3, 4, 4, }"))  # fmt: skip
    narc("npy header claims 4 GiB", b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**32 - 1))
    narc(
        "npy object dtype", npy("{'descr': '|O', 'fortran_order': False, 'shape': (1, 3, 2, 2), }")
    )
    return cases


def zip_bomb(size: int) -> bytes:
    """A torch zip whose one storage deflates ``size`` zero bytes (about size / 1000 bytes)."""
    buf = io.BytesIO()
    img = p_tensor(p_pid("0", size // 4), [3, 8, 8], [64, 8, 1])
    pkl = bp_pickle([img], [p_int(1)], p_list([p_int(3)]))
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl)
        with z.open("archive/data/0", "w", force_zip64=True) as m:
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                m.write(chunk)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the child's side


def write_case(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def load_case(loader: str, folder: Path) -> str:
    """Loads one case: "ok", "usage: <message>"; anything else propagates."""
    from puregen_fast.errors import UsageError
    from puregen_fast.eval import poisons as P

    try:
        if loader == "gm":
            P.load_gradient_matching(folder)
        elif loader == "cifar":  # a CIFAR-10 folder with a hostile batch
            from puregen_fast.data.datasets import open_dataset

            open_dataset("cifar10", folder, "test", download=False, cache=False)
        elif loader == "ckpt":  # an EBM .pt weights file
            from puregen_fast.models.checkpoints import load_ebm

            load_ebm(folder / "model.pt")
        elif loader == "bp":
            P.load_bullseye_polytope(folder / "poison_00799.pth")
        else:
            P.load_narcissus(folder / "best_noise_lab0.npy")
    except UsageError as e:
        return "usage: " + str(e)[:300]
    return "ok"


class _Deadline(BaseException):
    pass


def run_cases(folders: list[tuple[str, str, str]], deadline_s: float) -> dict:
    """Loads each (name, loader, folder) with a deadline; results by name, and the peak RSS."""

    def alarm(signum, frame):
        raise _Deadline()

    signal.signal(signal.SIGALRM, alarm)
    results = {}
    for name, loader, folder in folders:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, deadline_s)
        try:
            out = load_case(loader, Path(folder))
        except _Deadline:
            out = "hang"
        except BaseException as e:  # noqa: BLE001 - reported, the test fails on it
            out = f"other: {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results[name] = {"out": out, "s": round(time.monotonic() - t0, 3)}
    return {"results": results, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    limit = spec["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import puregen_fast.eval.poisons  # noqa: F401 - imported once, not inside a case's time

    out = run_cases(spec["cases"], spec["deadline_s"])
    if spec.get("fuzz"):
        from poison_fuzz import fuzz_main  # the hypothesis side, in the child as well

        out["fuzz"] = fuzz_main(spec)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
