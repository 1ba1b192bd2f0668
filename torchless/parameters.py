"""``Parameters``: a checkpoint on disk, opened: its config, tokenizer files and tensors.

Accepts a Hugging Face model folder (``config.json`` + ``model.safetensors`` or shards with
``model.safetensors.index.json`` + tokenizer files), a single ``.safetensors`` file (its
config from a ``config.json`` beside it or from the header's ``__metadata__["config"]``), or a
``.gguf`` file. Nothing is read beyond headers until a tensor is asked for.
"""
from __future__ import annotations

import json
import os

from .errors import ConfigError, CorruptFileError, MissingTensorError, TorchlessError
from .safetensors_io import SafetensorsFile
from .weights import Weight


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc


def _optional_json(folder: str, name: str) -> dict:
    p = os.path.join(folder, name)
    return _read_json(p) if os.path.exists(p) else {}


class Parameters:
    def __init__(self, path, config, files=None, gguf=None, folder=None, lazy=False):
        self.path = path
        self.config = config
        self.lazy = lazy
        self.folder = folder
        self.gguf = gguf
        self._files = files or []
        self._index = {}
        for f in self._files:
            for name in f.entries:
                if name in self._index:
                    raise CorruptFileError(
                        f"tensor {name!r} appears in both {self._index[name].path} and {f.path}"
                    )
                self._index[name] = f
        self.tokenizer_file = None
        self.tokenizer_config = {}
        self.generation_config = {}
        if folder:
            tj = os.path.join(folder, "tokenizer.json")
            self.tokenizer_file = tj if os.path.exists(tj) else None
            self.tokenizer_config = _optional_json(folder, "tokenizer_config.json")
            self.generation_config = _optional_json(folder, "generation_config.json")

    @property
    def format(self) -> str:
        return "gguf" if self.gguf is not None else "safetensors"

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path, lazy: bool = False) -> "Parameters":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise TorchlessError(f"no such file or folder: {path}")
        if os.path.isdir(path):
            return cls._load_folder(path, lazy)
        if path.endswith(".gguf") or _has_gguf_magic(path):
            from .gguf import GGUFFile

            g = GGUFFile(path)
            return cls(path, dict(g.metadata), gguf=g, folder=None, lazy=lazy)
        if path.endswith(".safetensors"):
            f = SafetensorsFile(path)
            folder = os.path.dirname(os.path.abspath(path))
            cfg_path = os.path.join(folder, "config.json")
            if os.path.exists(cfg_path):
                config = _read_json(cfg_path)
            elif "config" in f.metadata:
                try:
                    config = json.loads(f.metadata["config"])
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}: __metadata__ config is not JSON") from exc
            else:
                raise ConfigError(
                    f"{path}: no config.json beside it and no 'config' in its metadata; "
                    "the hyper-parameters cannot be known"
                )
            return cls(path, config, [f], folder=folder, lazy=lazy)
        raise TorchlessError(
            f"{path}: not a model folder, .safetensors or .gguf file"
        )

    @classmethod
    def _load_folder(cls, folder: str, lazy: bool) -> "Parameters":
        cfg_path = os.path.join(folder, "config.json")
        ggufs = sorted(p for p in os.listdir(folder) if p.endswith(".gguf"))
        if not os.path.exists(cfg_path):
            if ggufs:
                return cls.load(os.path.join(folder, ggufs[0]), lazy)
            raise ConfigError(f"{folder}: no config.json in the model folder")
        config = _read_json(cfg_path)
        if not isinstance(config, dict):
            raise ConfigError(f"{cfg_path}: expected a JSON object")
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            idx = _read_json(index)
            try:
                shard_names = sorted(set(idx["weight_map"].values()))
            except (KeyError, AttributeError, TypeError) as exc:
                raise CorruptFileError(f"{index}: no weight_map") from exc
            missing = [s for s in shard_names if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise CorruptFileError(f"{index}: shard files missing: {', '.join(missing)}")
            files = [SafetensorsFile(os.path.join(folder, s)) for s in shard_names]
            have = {n for f in files for n in f.entries}
            absent = [n for n in idx["weight_map"] if n not in have]
            if absent:
                raise CorruptFileError(
                    f"{index}: tensor {absent[0]!r} is listed but not in its shard"
                )
        elif os.path.exists(single):
            files = [SafetensorsFile(single)]
        else:
            found = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
            if not found:
                raise CorruptFileError(f"{folder}: no .safetensors weights in the model folder")
            files = [SafetensorsFile(os.path.join(folder, p)) for p in found]
        return cls(folder, config, files, folder=folder, lazy=lazy)

    # ---- tensors -------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        if self.gguf is not None:
            return list(self.gguf.tensor_infos)
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        if self.gguf is not None:
            return name in self.gguf.tensor_infos
        return name in self._index

    def shape(self, name: str) -> tuple:
        if self.gguf is not None:
            return tuple(self.gguf.tensor_infos[name].shape)
        return self._index[name].entries[name].shape

    def dtype(self, name: str) -> str:
        if self.gguf is not None:
            return self.gguf.tensor_infos[name].kind
        return self._index[name].entries[name].dtype

    def nbytes(self, name: str) -> int:
        if self.gguf is not None:
            return int(self.gguf.tensor_infos[name].nbytes or 0)
        return self._index[name].entries[name].nbytes

    def get(self, name: str, copy: bool | None = None) -> Weight:
        """The tensor ``name``: a view of the file's pages when lazy, a RAM copy when eager."""
        copy = (not self.lazy) if copy is None else copy
        if name not in self:
            raise MissingTensorError(f"tensor {name!r} is not in {self.path}")
        if self.gguf is not None:
            w = self.gguf.tensor(name)
            if copy:
                import numpy as np

                w = Weight(w.name, w.kind, w.shape, np.array(w.data))
            return w
        return self._index[name].weight(name, copy=copy)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.tensor_names)


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
