"""The plugin manager and the registry of architectures.

Plugins are discovered through the ``torchless`` entry-point group (the built-in families
included). ``TORCHLESS_PLUGINS`` (a comma-separated list of entry-point names) restricts
which are loaded. Tests and applications may also ``register_plugin(obj)`` at run time.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import pluggy

from . import hookspecs
from .architecture import ArchitectureConfig, ModelArchitecture, TensorNamePattern
from .errors import PluginError, UnknownArchitectureError

ENTRY_POINT_GROUP = "torchless"


@dataclass
class TensorMap:
    """How a checkpoint names its tensors, as canonical name -> checkpoint module name.

    Canonical names are GGUF's (``token_embd``, ``output_norm``, ``output``, and per layer
    ``attn_norm``, ``attn_q``/``attn_k``/``attn_v`` or fused ``attn_qkv``, ``attn_output``,
    ``attn_q_norm``, ``attn_k_norm``, ``post_attention_norm``, ``ffn_norm``, ``ffn_gate``,
    ``ffn_up`` or fused ``ffn_gate_up``, ``ffn_down``, ``post_ffw_norm``). ``.weight`` and
    ``.bias`` are appended to both sides. Per-layer names contain ``{i}``.
    """

    globals: dict
    layers: dict
    layer_prefix: str = "model.layers.{i}."

    def checkpoint_name(self, canonical: str, layer: int | None) -> str:
        if layer is None:
            return self.globals[canonical]
        return self.layer_prefix.format(i=layer) + self.layers[canonical]


@dataclass
class ArchitectureSpec:
    """One architecture variant a plugin registers.

    ``config_from_hf(hf_config: dict) -> ModelConfig`` translates ``config.json``;
    ``config_from_gguf(gguf_file) -> ModelConfig`` translates GGUF metadata (optional);
    ``gguf_tensor_map(cfg) -> TensorMap`` names GGUF tensors (default: canonical names);
    ``tensor_map(cfg) -> TensorMap`` names the checkpoint's tensors;
    ``gguf_fixup(canonical, weight, cfg) -> Weight`` undoes GGUF converter layout changes;
    ``model_class`` overrides the shared decoder (rarely needed).
    """

    name: str
    family: str
    config_from_hf: Callable
    tensor_map: Callable
    describe: ArchitectureConfig | None = None
    model_types: tuple = ()
    hf_architectures: tuple = ()
    gguf_architectures: tuple = ()
    aliases: tuple = ()
    tensor_pattern: TensorNamePattern | None = None
    config_from_gguf: Callable | None = None
    gguf_tensor_map: Callable | None = None  # default: GGUF names of tensor_map's tensors
    gguf_fixup: Callable | None = None
    model_class: type | None = None
    plugin: str = field(default="", compare=False)


def normalise_name(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", str(name).strip().lower())


class Registry:
    def __init__(self):
        self.specs: dict[str, ArchitectureSpec] = {}
        self.names: dict[str, str] = {}  # normalised alias -> family

    def add(self, spec: ArchitectureSpec, plugin: str = "") -> None:
        if not isinstance(spec, ArchitectureSpec):
            raise PluginError(f"plugin {plugin!r} registered {spec!r}, not an ArchitectureSpec")
        spec.plugin = plugin
        if spec.name in self.specs:
            other = self.specs[spec.name].plugin
            raise PluginError(
                f"architecture {spec.name!r} is registered twice: by plugin {other!r} "
                f"and by plugin {plugin!r}"
            )
        for mt in spec.model_types:
            for s in self.specs.values():
                if mt in s.model_types:
                    raise PluginError(
                        f"model_type {mt!r} is claimed by {s.name!r} (plugin {s.plugin!r}) "
                        f"and {spec.name!r} (plugin {plugin!r})"
                    )
        if spec.describe is None:
            spec.describe = ArchitectureConfig(ModelArchitecture(spec.family), variant=spec.name)
        if spec.tensor_pattern is not None and spec.describe.tensor_names == TensorNamePattern():
            spec.describe = dataclasses.replace(spec.describe, tensor_names=spec.tensor_pattern)
        self.specs[spec.name] = spec
        for alias in (spec.family, spec.name, *spec.aliases, *spec.model_types):
            self.names.setdefault(normalise_name(alias), spec.family)

    @property
    def families(self) -> list[str]:
        return sorted({s.family for s in self.specs.values()})

    def describe_registered(self) -> str:
        return ", ".join(
            f"{f} ({', '.join(s.name for s in self.specs.values() if s.family == f)})"
            for f in self.families
        ) or "none"

    def spec(self, name: str) -> ArchitectureSpec:
        if name in self.specs:
            return self.specs[name]
        raise UnknownArchitectureError(
            f"no architecture variant {name!r} is registered; registered: "
            f"{self.describe_registered()}"
        )

    def family_for_name(self, name) -> ModelArchitecture:
        key = normalise_name(name)
        if key in self.names:
            return ModelArchitecture(self.names[key])
        # "llama-3", "phi-3", "qwen2", "gemma3_text": strip version digits and suffixes.
        stem = re.sub(r"(\d+(\.\d+)?[a-z]*)+$", "", key)
        stem = re.sub(r"\d.*$", "", stem) if stem == key else stem
        if stem in self.names:
            return ModelArchitecture(self.names[stem])
        for alias, fam in self.names.items():
            if key.startswith(alias) and len(alias) >= 3:
                return ModelArchitecture(fam)
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; registered: {self.describe_registered()}"
        )

    def variants(self, family: str) -> list[ArchitectureSpec]:
        return [s for s in self.specs.values() if s.family == family]

    def detect(self, config: dict, tensor_names=(), family: str | None = None):
        """The spec for a config (and tensor names); None if nothing matches."""
        candidates = self.variants(family) if family else list(self.specs.values())
        mt = config.get("model_type") if config else None
        if mt:
            for s in candidates:
                if mt in s.model_types:
                    return s
        for arch in (config.get("architectures") or []) if config else []:
            for s in candidates:
                if arch in s.hf_architectures:
                    return s
        names = list(tensor_names)
        if names:
            best = None
            for s in candidates:
                p = s.tensor_pattern
                if p is not None and p.matches(names):
                    if best is None or p.specificity > best.tensor_pattern.specificity:
                        best = s
            return best
        return None

    def detect_gguf(self, gguf_arch: str):
        for s in self.specs.values():
            if gguf_arch in s.gguf_architectures:
                return s
        return None


class PluginManager:
    def __init__(self):
        self.pm = pluggy.PluginManager("torchless")
        self.pm.add_hookspecs(hookspecs)
        self._registry: Registry | None = None
        self._loaded_entry_points = False

    def load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        allowed = os.environ.get("TORCHLESS_PLUGINS")
        from importlib.metadata import entry_points

        wanted = None if allowed is None else {p.strip() for p in allowed.split(",") if p.strip()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and ep.name not in wanted:
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
            self.pm.register(module, name=ep.name)

    def register(self, plugin, name: str | None = None) -> str:
        self.load_entry_points()
        name = self.pm.register(plugin, name=name)
        self._registry = None
        try:
            self.registry()
        except Exception:
            self.pm.unregister(name=name)
            self._registry = None
            raise
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._registry = None

    def registry(self) -> Registry:
        if self._registry is None:
            self.load_entry_points()
            reg = Registry()
            for impl in self.pm.hook.register_architectures.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin)
                impl.function(register=lambda spec, _n=plugin_name: reg.add(spec, _n))
            self._registry = reg
        return self._registry


_manager: PluginManager | None = None


def plugin_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def registry() -> Registry:
    return plugin_manager().registry()


def register_plugin(plugin, name: str | None = None) -> str:
    """Register a plugin object at run time; returns its name (for :func:`unregister_plugin`)."""
    return plugin_manager().register(plugin, name=name)


def unregister_plugin(name: str) -> None:
    plugin_manager().unregister(name)


def reset_plugins() -> None:
    """Forget every plugin; the next lookup loads entry points afresh (reads TORCHLESS_PLUGINS)."""
    global _manager
    _manager = None
