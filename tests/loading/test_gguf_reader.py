"""Our GGUF reader: round trips through gguf.GGUFWriter, every error case, and a fuzz test."""

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchless.errors import (
    ConfigError,
    CorruptFileError,
    MissingTensorError,
    TorchlessError,
    UnsupportedError,
)
from torchless.gguf import GGUFFile
from torchless.kernels import quant as Q
from quant_blocks import random_blocks

QTYPES = {
    "q8_0": G.Q8_0,
    "q4_0": G.Q4_0,
    "q4_1": G.Q4_1,
    "q5_0": G.Q5_0,
    "q4_k": G.Q4_K,
    "q5_k": G.Q5_K,
    "q6_k": G.Q6_K,
}


def quant_bytes(kind, rows, cols, rng):
    return random_blocks(kind, rows, cols // Q.BLOCK_INFO[kind][0], rng)


SCALARS = [
    ("t.u8", V.UINT8, 200),
    ("t.i8", V.INT8, -100),
    ("t.u16", V.UINT16, 60000),
    ("t.i16", V.INT16, -30000),
    ("t.u32", V.UINT32, 4_000_000_000),
    ("t.i32", V.INT32, -2_000_000_000),
    ("t.f32", V.FLOAT32, 0.125),
    ("t.bool", V.BOOL, True),
    ("t.false", V.BOOL, False),
    ("t.str", V.STRING, "héllo wörld ✓"),
    ("t.u64", V.UINT64, 2**64 - 1),
    ("t.i64", V.INT64, -(2**62)),
    ("t.f64", V.FLOAT64, 1e-300),
]
ARRAYS = [
    ("a.u8", V.UINT8, [1, 2, 255], np.uint8),
    ("a.i8", V.INT8, [-1, 2], np.int8),
    ("a.u16", V.UINT16, [65535], np.uint16),
    ("a.i16", V.INT16, [-5, 5], np.int16),
    ("a.u32", V.UINT32, [1, 2**32 - 1], np.uint32),
    ("a.i32", V.INT32, [-7, 0, 7], np.int32),
    ("a.f32", V.FLOAT32, [0.5, -1.25], np.float32),
    ("a.u64", V.UINT64, [2**63], np.uint64),
    ("a.i64", V.INT64, [-(2**40)], np.int64),
    ("a.f64", V.FLOAT64, [3.5, 1e200], np.float64),
    ("a.bool", V.BOOL, [True, False, True], np.bool_),
]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, vt, val in SCALARS:
        w.add_key_value(key, val, vt)
    for key, vt, val, _ in ARRAYS:
        w.add_key_value(key, val, V.ARRAY, sub_type=vt)
    w.add_array("a.str", ["a", "", "ünï", "<0x0A>"])
    w.add_array("a.nested", [[1, 2, 3], [4], ["x", "y"]])
    w.add_array("a.deep", [[[1.5], [2.5, 3.5]]])
    tensors = {}
    tensors["f32.1d"] = ("f32", rng.standard_normal(7).astype(np.float32))
    tensors["f32.3d"] = ("f32", rng.standard_normal((2, 3, 5)).astype(np.float32))
    tensors["f16.2d"] = ("f16", rng.standard_normal((4, 6)).astype(np.float16))
    for name, (kind, arr) in tensors.items():
        w.add_tensor(name, arr)
    bf = rng.integers(0, 1 << 16, (3, 8), dtype=np.uint32).astype(np.uint16)
    bf[(bf & 0x7F80) == 0x7F80] &= 0x807F  # finite bf16 only
    w.add_tensor("bf16.2d", bf, raw_dtype=G.BF16)
    tensors["bf16.2d"] = ("bf16", bf)
    for kind, qt in QTYPES.items():
        epb, _ = Q.BLOCK_INFO[kind]
        data = quant_bytes(kind, 3, 2 * epb, rng)
        w.add_tensor(f"{kind}.w", data, raw_shape=data.shape, raw_dtype=qt)
        tensors[f"{kind}.w"] = (kind, data)
    q3 = quant_bytes("q8_0", 2 * 3, 64, rng)  # a 3-D quantized tensor [2, 3, 64]
    w.add_tensor("q8_0.3d", q3.reshape(2, 3, -1), raw_shape=(2, 3, 68), raw_dtype=G.Q8_0)
    tensors["q8_0.3d"] = ("q8_0", q3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def test_metadata_round_trip(model_file):
    path, _ = model_file
    with GGUFFile(path) as f:
        assert f.version == 3
        assert f.architecture == "llama"
        assert f.alignment == 32 and f.data_start % 32 == 0
        for key, vt, val in SCALARS:
            got = f.metadata[key]
            if vt == V.FLOAT32:
                assert got == np.float32(val)
            else:
                assert got == val and type(got) is type(val), key
            assert f.metadata_types[key] == vt.name.lower()
        for key, vt, val, dt in ARRAYS:
            got = f.metadata[key]
            assert isinstance(got, np.ndarray) and got.dtype == dt, key
            np.testing.assert_array_equal(got, np.array(val, dtype=dt))
            assert f.metadata_types[key] == f"array[{vt.name.lower()}]"
        assert f.metadata["a.str"] == ["a", "", "ünï", "<0x0A>"]
        nested = f.metadata["a.nested"]
        assert [list(nested[0]), list(nested[1]), nested[2]] == [[1, 2, 3], [4], ["x", "y"]]
        deep = f.metadata["a.deep"]
        assert [list(a) for a in deep[0]] == [[1.5], [2.5, 3.5]]


def test_get_checks_types(model_file):
    path, _ = model_file
    with GGUFFile(path) as f:
        assert f.get("t.u32", int) == 4_000_000_000
        assert f.get("t.u32", float) == 4e9  # an integer is a fine float
        assert f.get("t.f32", float) == 0.125
        assert f.get("t.str", str) == "héllo wörld ✓"
        assert f.get("t.bool", bool) is True
        assert f.get("a.i32", list) == [-7, 0, 7]
        assert f.get("a.str", list) == ["a", "", "ünï", "<0x0A>"]
        assert f.get("a.f32", np.ndarray).dtype == np.float32
        assert f.get("t.str", (int, str)) == "héllo wörld ✓"
        assert f.get("missing.key", int, default=5) == 5
        assert f.get("missing.key", default=None) is None
        for key, typ in [
            ("t.f32", int),
            ("t.str", int),
            ("t.bool", int),
            ("t.u8", str),
            ("t.u8", bool),
            ("a.str", np.ndarray),
            ("t.u32", list),
            ("a.i32", str),
        ]:
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                f.get(key, typ)
        with pytest.raises(ConfigError, match="missing.key"):
            f.get("missing.key", int)


def test_tensors_round_trip_zero_copy(model_file):
    path, tensors = model_file
    f = GGUFFile(path)
    assert list(f.tensor_infos) == list(tensors)
    for name, (kind, arr) in tensors.items():
        info = f.tensor_infos[name]
        assert info.kind == kind and info.name == name
        assert info.offset % f.alignment == 0
        w = f.tensor(name)
        assert w.kind == kind and w.name == name
        assert not w.data.flags.writeable and not w.data.flags.owndata  # a view of the map
        if kind in ("f32", "f16"):
            assert w.shape == arr.shape and w.data.dtype == arr.dtype
            np.testing.assert_array_equal(w.data, arr)
        elif kind == "bf16":
            assert w.data.dtype == np.uint16 and w.shape == arr.shape
            np.testing.assert_array_equal(w.data, arr)
        else:
            epb, bpb = Q.BLOCK_INFO[kind]
            rows = arr.shape[0]
            assert w.data.dtype == np.uint8 and w.data.shape == (rows, arr.shape[1])
            assert w.shape[-1] == arr.shape[1] // bpb * epb and w.rows == rows
            assert info.nbytes == arr.nbytes
            np.testing.assert_array_equal(w.data, arr)
            ref = gguf.quants.dequantize(arr, QTYPES[kind])
            np.testing.assert_array_equal(w.to_f32().reshape(rows, -1), ref)
    assert f.tensor_infos["q8_0.3d"].shape == (2, 3, 64)
    assert f.tensor_infos["f32.3d"].shape == (2, 3, 5)
    with pytest.raises(MissingTensorError):
        f.tensor("nope")
    # kernels run on the read-only views directly
    w = f.tensor("q4_k.w")
    x = np.ones(w.cols, np.float32)
    np.testing.assert_allclose(
        Q.matvec("q4_k", w.data, x), w.to_f32().sum(axis=1), rtol=1e-4, atol=1e-3
    )
    f.close()
    f.close()  # idempotent, even with views alive
    assert f.closed
    with pytest.raises(TorchlessError):
        f.tensor("f32.1d")
    np.testing.assert_array_equal(w.data, tensors["q4_k.w"][1])  # old views stay valid


def test_custom_alignment_and_version_2(tmp_path):
    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(3, dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(path.read_bytes())
    with GGUFFile(path) as f:
        assert f.alignment == 64 and f.data_start % 64 == 0
        assert f.tensor_infos["b"].offset == 64
        np.testing.assert_array_equal(f.tensor("b").data, np.arange(5, dtype=np.float16))
        assert f.architecture == "gemma3"
    raw[4:8] = struct.pack("<I", 2)
    path.write_bytes(bytes(raw))
    with GGUFFile(path) as f:
        assert f.version == 2
        np.testing.assert_array_equal(f.tensor("a").data, np.arange(3, dtype=np.float32))


# ------------------------------------------------------------------ hand-built files


def s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name, ne, gtype, offset) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", gtype, offset)
    )


def build(
    kvs=(), tensors=(), data=b"", version=3, magic=b"GGUF", n_tensors=None, n_kv=None, alignment=32
) -> bytes:
    head = magic + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % alignment)
    return body + data


ARCH = kv("general.architecture", 8, s("llama"))


def write(tmp_path, raw: bytes, name="x.gguf"):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def expect(tmp_path, raw, exc, *match):
    p = write(tmp_path, raw)
    with pytest.raises(exc) as ei:
        GGUFFile(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_minimal_hand_built_file(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    empties = [
        kv("e.ints", 9, struct.pack("<IQ", 5, 0)),
        kv("e.strs", 9, struct.pack("<IQ", 8, 0)),
        kv("e.str", 8, s("")),
    ]
    tensors = [tinfo("w", [4, 2], 0, 0), tinfo("nothing", [0], 0, 32)]
    raw = build([ARCH, *empties], tensors, data)
    with GGUFFile(write(tmp_path, raw)) as f:
        np.testing.assert_array_equal(
            f.tensor("w").data, np.arange(8, dtype=np.float32).reshape(2, 4)
        )
        assert f.tensor("nothing").data.shape == (0,)
        assert f.metadata["e.ints"].shape == (0,) and f.metadata["e.ints"].dtype == np.int32
        assert f.metadata["e.strs"] == [] and f.metadata["e.str"] == ""


def test_wrong_magic(tmp_path):
    expect(tmp_path, build([ARCH], magic=b"GGML"), CorruptFileError, "GGML", "not a GGUF")
    expect(tmp_path, b"", CorruptFileError, "not a GGUF")
    expect(tmp_path, b"GG", CorruptFileError)


@pytest.mark.parametrize("version", [0, 1, 4, 7, 2**31])
def test_unsupported_version(tmp_path, version):
    expect(tmp_path, build([ARCH], version=version), UnsupportedError, f"version {version}")


def test_big_endian_file_is_named(tmp_path):
    raw = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    expect(tmp_path, raw, UnsupportedError, "big-endian")


def test_unknown_value_type(tmp_path):
    expect(
        tmp_path,
        build([kv("k.bad", 13, b"\0" * 8)]),
        CorruptFileError,
        "k.bad",
        "unknown value type 13",
    )
    bad_array = kv("k.arr", 9, struct.pack("<IQ", 77, 1) + b"\0" * 8)
    expect(tmp_path, build([bad_array]), CorruptFileError, "k.arr", "77")


def test_string_and_array_lengths_past_end(tmp_path):
    long_str = kv("k.s", 8, struct.pack("<Q", 10**6) + b"abc")
    expect(tmp_path, build([long_str]), CorruptFileError, "k.s", "past the end")
    huge_str = kv("k.s", 8, struct.pack("<Q", 2**64 - 1) + b"abc")
    expect(tmp_path, build([huge_str]), CorruptFileError, "k.s")
    huge_key = struct.pack("<Q", 2**63) + b"k"
    expect(tmp_path, build([huge_key]), CorruptFileError)
    huge_arr = kv("k.a", 9, struct.pack("<IQ", 4, 2**62) + b"\0" * 16)
    expect(tmp_path, build([huge_arr]), CorruptFileError, "k.a", "past the end")
    huge_str_arr = kv("k.sa", 9, struct.pack("<IQ", 8, 2**40) + s("x"))
    expect(tmp_path, build([huge_str_arr]), CorruptFileError, "k.sa")
    bad_utf8_key = struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 4) + b"\0" * 4
    expect(tmp_path, build([bad_utf8_key]), CorruptFileError, "UTF-8")


def test_string_values_keep_undecodable_bytes(tmp_path):
    raw = build([ARCH, kv("tok", 9, struct.pack("<IQ", 8, 2) + s(b"\xe4\xb8") + s("ok"))])
    with GGUFFile(write(tmp_path, raw)) as f:
        toks = f.metadata["tok"]
        assert toks[1] == "ok"
        assert toks[0].encode("utf-8", "surrogateescape") == b"\xe4\xb8"


def test_truncated_files(tmp_path, model_file):
    path, _ = model_file
    raw = path.read_bytes()
    with GGUFFile(path) as f:
        data_start = f.data_start
        last = max(i.data_offset + i.nbytes for i in f.tensor_infos.values())
    cuts = sorted(
        {5, 8, 12, 23, 24, 30, 100, data_start // 2, data_start - 1, data_start + 1, last - 1}
    )
    for cut in cuts:
        p = write(tmp_path, raw[:cut], f"cut{cut}.gguf")
        with pytest.raises(CorruptFileError, match="truncated|past the end|corrupt"):
            GGUFFile(p)


def test_tensor_data_past_end(tmp_path):
    raw = build([ARCH], [tinfo("w", [64, 4], 0, 0)], b"\0" * 100)
    expect(tmp_path, raw, CorruptFileError, "'w'", "past the end")
    raw = build([ARCH], [tinfo("w", [4], 0, 2**62)], b"\0" * 16)
    expect(tmp_path, raw, CorruptFileError, "'w'", "past the end")
    raw = build([ARCH], [tinfo("w", [2**32, 2**32, 2**31], 0, 0)], b"\0" * 16)
    expect(tmp_path, raw, CorruptFileError, "'w'")


def test_misaligned_offset(tmp_path):
    raw = build([ARCH], [tinfo("a", [4], 0, 0), tinfo("b", [4], 0, 16)], b"\0" * 64)
    expect(tmp_path, raw, CorruptFileError, "'b'", "alignment")
    raw = build([ARCH, kv("general.alignment", 4, struct.pack("<I", 3))])
    expect(tmp_path, raw, CorruptFileError, "power of two")
    raw = build([ARCH, kv("general.alignment", 8, s("32"))])
    expect(tmp_path, raw, CorruptFileError, "alignment")


@pytest.mark.parametrize("gtype, name", [(16, "IQ2_XXS"), (19, "IQ1_S"), (39, "MXFP4"), (99, "99")])
def test_unsupported_tensor_type_is_named_on_access(tmp_path, gtype, name):
    raw = build([ARCH], [tinfo("odd", [256, 2], gtype, 0), tinfo("ok", [4], 0, 0)], b"\0" * 512)
    with GGUFFile(write(tmp_path, raw)) as f:
        np.testing.assert_array_equal(f.tensor("ok").data, np.zeros(4, np.float32))
        assert not f.tensor_infos["odd"].supported
        with pytest.raises(UnsupportedError, match=name):
            f.tensor("odd")
        with pytest.raises(UnsupportedError, match="odd"):
            _ = f.tensor_infos["odd"].kind


def test_row_length_not_multiple_of_block(tmp_path):
    raw = build([ARCH], [tinfo("q", [48, 2], 8, 0)], b"\0" * 256)
    expect(tmp_path, raw, CorruptFileError, "'q'", "block size 32")
    raw = build([ARCH], [tinfo("k", [128], 12, 0)], b"\0" * 256)
    expect(tmp_path, raw, CorruptFileError, "'k'", "256")


def test_too_many_dims(tmp_path):
    raw = build([ARCH], [tinfo("w", [1, 1, 1, 1, 2], 0, 0)], b"\0" * 64)
    expect(tmp_path, raw, CorruptFileError, "'w'", "5 dimensions")


def test_absurd_counts(tmp_path):
    expect(tmp_path, build([ARCH], n_tensors=2**40), CorruptFileError, "tensors")
    expect(tmp_path, build([ARCH], n_tensors=2**64 - 1), CorruptFileError, "tensors")
    expect(tmp_path, build([ARCH], n_kv=2**63), CorruptFileError, "metadata")
    expect(tmp_path, build([ARCH], n_kv=5), CorruptFileError)


def test_duplicates(tmp_path):
    expect(tmp_path, build([ARCH, ARCH]), CorruptFileError, "twice")
    raw = build([ARCH], [tinfo("w", [4], 0, 0), tinfo("w", [4], 0, 32)], b"\0" * 64)
    expect(tmp_path, raw, CorruptFileError, "'w'", "twice")


def test_deeply_nested_arrays_rejected(tmp_path):
    payload = b""
    depth = 40
    inner = struct.pack("<IQ", 4, 1) + struct.pack("<I", 1)
    payload = inner
    for _ in range(depth):
        payload = struct.pack("<IQ", 9, 1) + payload
    expect(tmp_path, build([kv("deep", 9, payload)]), CorruptFileError, "deep")


def test_missing_architecture_is_config_error(tmp_path):
    no_arch = build([kv("general.name", 8, s("x"))])
    int_arch = build([kv("general.architecture", 4, struct.pack("<I", 1))])
    for raw in (no_arch, int_arch):
        f = GGUFFile(write(tmp_path, raw))
        with f, pytest.raises(ConfigError, match="general.architecture"):
            _ = f.architecture


# ------------------------------------------------------------------ fuzzing


def _fuzz_base():
    """A small valid file plus the offsets of its length/count fields."""
    fields = []
    parts = [b"GGUF", struct.pack("<I", 3)]
    pos = 8

    def add(b, is_len=False):
        nonlocal pos
        if is_len:
            fields.append(pos)
        parts.append(b)
        pos += len(b)

    def add_s(text):
        b = text.encode()
        add(struct.pack("<Q", len(b)), True)
        add(b)

    add(struct.pack("<Q", 3), True)  # tensor count
    add(struct.pack("<Q", 4), True)  # kv count
    add_s("general.architecture")
    add(struct.pack("<I", 8))
    add_s("llama")
    add_s("a.tokens")
    add(struct.pack("<II", 9, 8))
    add(struct.pack("<Q", 2), True)
    add_s("ab")
    add_s("c")
    add_s("a.ints")
    add(struct.pack("<II", 9, 5))
    add(struct.pack("<Q", 3), True)
    add(struct.pack("<3i", 1, 2, 3))
    add_s("a.nest")
    add(struct.pack("<II", 9, 9))
    add(struct.pack("<Q", 1), True)
    add(struct.pack("<I", 6))
    add(struct.pack("<Q", 2), True)
    add(struct.pack("<2f", 1, 2))
    tens = [("w.f32", [8, 2], 0, 0, 64), ("w.q8", [64, 2], 8, 64, 136), ("w.f16", [4], 1, 224, 8)]
    for name, ne, gt, off, _ in tens:
        add_s(name)
        add(struct.pack("<I", len(ne)))
        for d in ne:
            add(struct.pack("<Q", d), True)
        add(struct.pack("<I", gt))
        add(struct.pack("<Q", off), True)
    header_end = pos
    add(b"\0" * (-pos % 32))
    rng = np.random.default_rng(0)
    data = bytearray(rng.integers(0, 256, 256, dtype=np.uint8).tobytes())
    blocks = np.frombuffer(data, np.uint8, 136, 64).reshape(4, 34).copy()
    blocks[:, :2] = np.full((4, 1), 0.5, "<f2").view(np.uint8)
    data[64:200] = blocks.tobytes()
    add(bytes(data))
    return b"".join(parts), fields, header_end


FUZZ_BASE, LEN_FIELDS, HEADER_END = _fuzz_base()

mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, HEADER_END - 1), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, HEADER_END - 1), st.integers(0, 7)),
    st.tuples(
        st.just("len"),
        st.sampled_from(LEN_FIELDS),
        st.sampled_from([0, 1, 2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1, 2**40, 255, 4096]),
    ),
    st.tuples(st.just("u64"), st.integers(0, HEADER_END - 8), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("cut"), st.integers(0, len(FUZZ_BASE)), st.just(0)),
)


def test_fuzz_base_is_valid(tmp_path):
    with GGUFFile(write(tmp_path, FUZZ_BASE)) as f:
        assert f.metadata["a.tokens"] == ["ab", "c"]
        assert [list(a) for a in f.metadata["a.nest"]] == [[1.0, 2.0]]
        assert sorted(f.tensor_infos) == ["w.f16", "w.f32", "w.q8"]
        assert np.all(np.isfinite(f.tensor("w.q8").to_f32()))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(muts=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_reader_never_raises_foreign_exceptions(tmp_path_factory, muts):
    raw = bytearray(FUZZ_BASE)
    for op, pos, val in muts:
        if op == "set" and pos < len(raw):
            raw[pos] = val
        elif op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << val
        elif op in ("len", "u64") and pos + 8 <= len(raw):
            raw[pos : pos + 8] = struct.pack("<Q", val)
        elif op == "cut":
            del raw[pos:]
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(bytes(raw))
    try:
        f = GGUFFile(path)
    except TorchlessError as e:
        assert str(path) in str(e)
        return
    with f:
        for key in list(f.metadata):
            try:
                f.get(key, int)
            except ConfigError:
                pass
        for name in list(f.tensor_infos):
            try:
                w = f.tensor(name)
            except TorchlessError:
                continue
            assert w.data.nbytes == f.tensor_infos[name].nbytes
            w.data.sum()  # the view is really readable


def test_type_table_matches_gguf():
    from torchless.gguf import GGML_TYPE_INFO, GGML_TYPES

    for tid, (name, epb, bpb) in GGML_TYPE_INFO.items():
        if tid in {int(t) for t in gguf.GGML_QUANT_SIZES}:
            assert (name, (epb, bpb)) == (G(tid).name, gguf.GGML_QUANT_SIZES[G(tid)])
    for tid, (_kind, epb, bpb) in GGML_TYPES.items():
        assert GGML_TYPE_INFO[tid][1:] == (epb, bpb)


def test_unsupported_types_still_checked_for_size(tmp_path):
    raw = build([ARCH], [tinfo("odd", [256, 2], 16, 0)], b"\0" * 132)  # IQ2_XXS: 2 x 66 bytes
    with GGUFFile(write(tmp_path, raw)) as f:
        assert f.tensor_infos["odd"].nbytes == 132
    raw = build([ARCH], [tinfo("odd", [256, 3], 16, 0)], b"\0" * 132)
    expect(tmp_path, raw, CorruptFileError, "'odd'", "past the end")
