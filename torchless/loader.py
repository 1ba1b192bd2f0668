"""From a path to a running model: detection, config translation, tensor mapping, checks.

``ModelLoader.load_auto(path)`` detects the architecture; ``ModelLoader.load_as(path, arch)``
forces a family. Lazy loading keeps weights as views of the file's pages; eager loading copies
them into RAM in their stored dtype.
"""
from __future__ import annotations

from .architecture import ModelArchitecture
from .engine import DecoderModel, expected_shapes
from .errors import MissingTensorError, TensorShapeError, UnknownArchitectureError
from .parameters import Parameters
from .plugins import registry

CANONICAL_GLOBALS = ("token_embd", "output_norm", "output")


def _resolve_spec(params: Parameters, family: str | None):
    reg = registry()
    if params.format == "gguf":
        arch = params.gguf.architecture
        spec = reg.detect_gguf(arch)
        if spec is not None and spec.config_from_gguf is None:
            spec = None
        if spec is None or (family and spec.family != family):
            if family:
                cands = [s for s in reg.variants(family) if s.config_from_gguf]
                if cands:
                    return cands[0]
            raise UnknownArchitectureError(
                f"{params.path}: GGUF architecture {arch!r} is not supported by any plugin; "
                f"registered: {reg.describe_registered()}"
            )
        return spec
    if family:
        variants = reg.variants(family)
        if not variants:
            raise UnknownArchitectureError(
                f"unknown architecture {family!r}; registered: {reg.describe_registered()}"
            )
        spec = reg.detect(params.config, params.tensor_names, family=family)
        return spec or variants[0]
    spec = reg.detect(params.config, params.tensor_names)
    if spec is None:
        mt = params.config.get("model_type")
        raise UnknownArchitectureError(
            f"{params.path}: cannot tell the architecture (model_type={mt!r}, "
            f"architectures={params.config.get('architectures')}); registered: "
            f"{reg.describe_registered()}"
        )
    return spec


def gather_tensors(params: Parameters, spec, cfg) -> dict:
    """Canonical name -> Weight for every tensor the config needs, with clear errors."""
    if params.format == "gguf":
        from .gguf_config import identity_tensor_map

        tmap = (spec.gguf_tensor_map(cfg) if spec.gguf_tensor_map
                else identity_tensor_map(spec.tensor_map(cfg)))
    else:
        tmap = spec.tensor_map(cfg)
    shapes = expected_shapes(cfg)
    out = {}
    wanted = [(c, None) for c in tmap.globals] + [
        (c, i) for i in range(cfg.num_layers) for c in tmap.layers
    ]
    for canon, layer in wanted:
        if layer is not None and not layer_has(cfg, canon, layer):
            continue
        src = tmap.checkpoint_name(canon, layer)
        dst = canon if layer is None else f"blk.{layer}.{canon}"
        if canon in EXPERT_NAMES:
            out[f"{dst}.weight"] = _experts(params, spec, cfg, canon, src, shapes)
            continue
        for suffix in ("weight", "bias"):
            name = f"{src}.{suffix}"
            if name in params:
                w = params.get(name)
                w.source = name
                if params.format == "gguf" and spec.gguf_fixup is not None:
                    w = spec.gguf_fixup(canon, w, cfg)
                    w.source = name
                out[f"{dst}.{suffix}"] = w
            elif suffix == "weight":
                if canon == "output" and cfg.tie_embeddings:
                    continue
                raise MissingTensorError(
                    f"{params.path}: missing tensor {name!r} (expected shape "
                    f"{list(shapes.get(canon, ()))}) needed by architecture {spec.name!r}"
                )
            elif cfg.norm == "layernorm" and canon.endswith("norm") and canon in (
                "attn_norm", "output_norm"
            ):
                raise MissingTensorError(f"{params.path}: missing LayerNorm bias {name!r}")
    return out


EXPERT_NAMES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
MOE_NAMES = ("ffn_gate_inp",) + EXPERT_NAMES
SHARED_EXPERT_NAMES = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
DENSE_FFN_NAMES = ("ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down")


def layer_has(cfg, canon: str, layer: int) -> bool:
    """Whether layer ``layer`` holds tensor ``canon``: a mixture-of-experts layer has the
    router and expert tensors instead of the dense MLP's (``cfg.moe.layers``)."""
    if canon in MOE_NAMES:
        return cfg.is_moe_layer(layer)
    if canon in SHARED_EXPERT_NAMES:
        return cfg.is_moe_layer(layer) and cfg.moe.shared_intermediate_size > 0
    if canon in DENSE_FFN_NAMES:
        return not cfg.is_moe_layer(layer)
    return True


def _experts(params: Parameters, spec, cfg, canon: str, src: str, shapes: dict):
    """The experts of one projection: a 3-D tensor (GGUF) or one tensor per expert whose
    checkpoint name has ``{j}`` for the expert index (Hugging Face)."""
    from .weights import Experts

    want = list(shapes[canon])
    if "{j}" in src:
        ws = []
        for j in range(cfg.moe.num_experts):
            name = src.format(j=j) + ".weight"
            if name not in params:
                raise MissingTensorError(
                    f"{params.path}: missing tensor {name!r} (expert {j} of "
                    f"{cfg.moe.num_experts}, expected shape {want[1:]}) needed by "
                    f"architecture {spec.name!r}")
            w = params.get(name)
            w.source = name
            ws.append(w)
        ex = Experts(src.replace("{j}", "*"), ws)
    else:
        name = src + ".weight"
        if name not in params:
            raise MissingTensorError(f"{params.path}: missing tensor {name!r} (expected shape "
                                     f"{want}) needed by architecture {spec.name!r}")
        w = params.get(name)
        if len(w.shape) != 3:
            raise TensorShapeError(f"tensor {name!r} ({canon}) has shape {list(w.shape)}, "
                                   f"expected {want}")
        ex = Experts.from_3d(w)
    ex.source = src
    return ex


def build_tokenizer(params: Parameters, cfg):
    from .tokenizer import Tokenizer

    if params.format == "gguf":
        from .gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(params.gguf, cfg)
    if params.tokenizer_file is None:
        return None
    return Tokenizer.from_file(params.tokenizer_file, params.tokenizer_config,
                               bos_id=cfg.bos_token_id, eos_ids=cfg.eos_token_ids)


def build_model(params: Parameters, family: str | None = None, model_class=None,
                quantize: str | None = None, act_quant: bool | None = None,
                numerics: str = "torchless"):
    spec = _resolve_spec(params, family)
    if params.format == "gguf":
        cfg = spec.config_from_gguf(params.gguf)
    else:
        cfg = spec.config_from_hf(params.config)
    gen = params.generation_config
    if gen and "eos_token_id" in gen and gen["eos_token_id"] is not None:
        extra = gen["eos_token_id"]
        extra = extra if isinstance(extra, list) else [extra]
        cfg.eos_token_ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
    tensors = gather_tensors(params, spec, cfg)
    if quantize:
        if numerics != "torchless":
            from .errors import TorchlessError

            raise TorchlessError(f"numerics={numerics!r} computes what llama.cpp computes on the "
                                 "file's own weights; it cannot be combined with quantize=")
        from .quantize import quantize_tensors

        tensors = quantize_tensors(tensors, quantize)
    tokenizer = build_tokenizer(params, cfg)
    # A plugin's own model class wins (its forward differs); else the family class asked for.
    cls = spec.model_class or model_class or FAMILY_CLASSES.get(spec.family, DecoderModel)
    # numerics is passed only when asked for, so that a plugin's own model class written
    # against the older signature keeps loading
    extra = {} if numerics == "torchless" else {"numerics": numerics}
    return cls(cfg, tensors, tokenizer=tokenizer, spec=spec, params=params, act_quant=act_quant,
               **extra)


class ModelLoader:
    @staticmethod
    def load_auto(path, lazy: bool = False, quantize: str | None = None,
                  threads: int | None = None, act_quant: bool | None = None,
                  numerics: str = "torchless") -> DecoderModel:
        """Load a model folder, ``.safetensors`` or ``.gguf`` file, detecting its family.

        ``lazy`` memory-maps the weights; ``quantize`` ("q8_0", "q4_0") converts them on
        load; ``threads`` sets the kernel thread count (default: TORCHLESS_NUM_THREADS or
        every core); ``act_quant`` makes quantized weights meet 8-bit activations as
        llama.cpp does (faster); by default it is on when the weights are block-quantized
        (GGUF or ``quantize=``), unless TORCHLESS_ACT_QUANT=0. ``numerics="llama.cpp"``
        computes in llama.cpp's float order, bit for bit, for the GGUF kinds and operations
        :mod:`torchless.ggml_numerics` covers (Gemma 3's), so that greedy text is llama.cpp's.
        """
        _threads(threads)
        params = Parameters.load(path, lazy=lazy)
        return build_model(params, quantize=quantize, act_quant=act_quant, numerics=numerics)

    @staticmethod
    def load_as(path, arch, lazy: bool = False, quantize: str | None = None,
                threads: int | None = None) -> DecoderModel:
        """Load as family ``arch`` (a ModelArchitecture or a name such as "phi-3")."""
        _threads(threads)
        family = ModelArchitecture.from_str(arch)
        params = Parameters.load(path, lazy=lazy)
        return build_model(params, family=str(family), quantize=quantize)


def _threads(n):
    if n is not None:
        from .threads import set_num_threads

        set_num_threads(n)


class DynamicModel:
    """Runtime choice of family: ``DynamicModel.load_auto(params_or_path)``."""

    @staticmethod
    def load_auto(params, lazy: bool = False, quantize: str | None = None) -> DecoderModel:
        if not isinstance(params, Parameters):
            params = Parameters.load(params, lazy=lazy)
        return build_model(params, quantize=quantize)

    @staticmethod
    def load_as(params, arch, lazy: bool = False) -> DecoderModel:
        if not isinstance(params, Parameters):
            params = Parameters.load(params, lazy=lazy)
        return build_model(params, family=str(ModelArchitecture.from_str(arch)))


def _family_class(name: str, family: str, lazy: bool):
    def load(cls, params, quantize: str | None = None):
        """Load ``params`` (a Parameters or a path) as this family."""
        if not isinstance(params, Parameters):
            params = Parameters.load(params, lazy=lazy)
        elif params.lazy != lazy:
            params = Parameters.load(params.path, lazy=lazy)
        return build_model(params, family=family, model_class=cls, quantize=quantize)

    doc = f"A {family} model{' with memory-mapped weights' if lazy else ''}."
    return type(name, (DecoderModel,), {"family": family, "load": classmethod(load),
                                        "lazy": lazy, "__doc__": doc})


LLaMA = _family_class("LLaMA", "llama", False)
LazyLLaMA = _family_class("LazyLLaMA", "llama", True)
Mistral = _family_class("Mistral", "mistral", False)
LazyMistral = _family_class("LazyMistral", "mistral", True)
Phi = _family_class("Phi", "phi", False)
LazyPhi = _family_class("LazyPhi", "phi", True)
Gemma = _family_class("Gemma", "gemma", False)
LazyGemma = _family_class("LazyGemma", "gemma", True)
Qwen = _family_class("Qwen", "qwen", False)
LazyQwen = _family_class("LazyQwen", "qwen", True)
FAMILY_CLASSES = {"llama": LLaMA, "mistral": Mistral, "phi": Phi, "gemma": Gemma, "qwen": Qwen}
