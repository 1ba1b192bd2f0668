"""The kernel cache guard drops stale Numba cache entries when any kernel source changes."""
import torchless.kernels as K


def test_guard_drops_kernel_entries_once_per_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "_cache_dirs", lambda: [tmp_path])
    stale = [tmp_path / "decode.decode_layer-124.py311.nbi",
             tmp_path / "decode.decode_layer-124.py311.1.nbc",
             tmp_path / "quant_q8.matvec_q8act_q8_0-900.py311.nbi"]
    other = tmp_path / "somebody_else.f-1.py311.nbi"
    for f in stale + [other]:
        f.write_bytes(b"x")
    (tmp_path / "torchless-kernels.stamp").write_text("an older fingerprint")
    K._guard_cache()
    assert not any(f.exists() for f in stale)
    assert other.exists()
    assert (tmp_path / "torchless-kernels.stamp").read_text() == K._fingerprint()
    # same sources: entries written since are kept
    fresh = tmp_path / "ops.attention-160.py311.nbi"
    fresh.write_bytes(b"x")
    K._guard_cache()
    assert fresh.exists()


def test_fingerprint_follows_the_sources(tmp_path, monkeypatch):
    a = K._fingerprint()
    src = tmp_path / "k"
    src.mkdir()
    for p in K._HERE.glob("*.py"):
        (src / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(K, "_HERE", src)
    assert K._fingerprint() == a
    (src / "decode.py").write_text((src / "decode.py").read_text() + "\n# changed\n")
    assert K._fingerprint() != a
