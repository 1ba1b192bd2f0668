"""torchless: run LLMs on the CPU with NumPy and Numba, no PyTorch.

    import torchless
    model = torchless.ModelLoader.load_auto("path/to/model")      # folder, .safetensors, .gguf
    state = torchless.InferenceState(model.config)
    model.fast_forward(state, token)                                # state.logits: [vocab]
    model.generate("The capital of France is", max_new_tokens=16)  # -> new token ids
"""
from . import threads as _threads  # noqa: F401  (first: sets OMP_WAIT_POLICY before Numba's pool)
from .architecture import (
    ActivationType,
    ArchitectureConfig,
    ModelArchitecture,
    NormType,
    RopeScaling,
    TensorNamePattern,
    detect_architecture,
    detect_architecture_from_tensors,
)
from .config import ModelConfig
from .engine import DecoderModel
from .errors import (
    ConfigError,
    CorruptFileError,
    MissingTensorError,
    PluginError,
    SequenceLengthError,
    TensorShapeError,
    TokenError,
    TorchlessError,
    UnknownArchitectureError,
    UnsupportedError,
)
from .hookspecs import hookimpl
from .loader import (
    DynamicModel,
    Gemma,
    LazyGemma,
    LazyLLaMA,
    LazyMistral,
    LazyPhi,
    LazyQwen,
    LLaMA,
    Mistral,
    ModelLoader,
    Phi,
    Qwen,
)
from .parameters import Parameters
from . import pull  # noqa: F401  (torchless.pull.pull("smollm2") -> the file's path)
from .plugins import ArchitectureSpec, TensorMap, register_plugin, registry, unregister_plugin
from .rope import RopeConfig
from .state import InferenceState, KVCache, common_prefix_len
from .threads import set_num_threads
from .weights import Weight

Model = DecoderModel  # the protocol every loaded model satisfies

__version__ = "0.1.0"

__all__ = [
    "ActivationType", "ArchitectureConfig", "ArchitectureSpec", "ConfigError", "CorruptFileError",
    "DecoderModel", "DynamicModel", "Gemma", "InferenceState", "KVCache", "LazyGemma",
    "LazyLLaMA", "LazyMistral", "LazyPhi", "LazyQwen", "LLaMA", "Mistral", "MissingTensorError",
    "Model", "ModelArchitecture", "ModelConfig", "ModelLoader", "NormType", "Parameters", "Phi",
    "PluginError", "Qwen", "RopeConfig", "RopeScaling", "SequenceLengthError", "TensorMap",
    "TensorNamePattern", "TensorShapeError", "TokenError", "TorchlessError",
    "UnknownArchitectureError", "UnsupportedError", "Weight", "common_prefix_len",
    "detect_architecture",
    "detect_architecture_from_tensors", "hookimpl", "register_plugin", "registry",
    "set_num_threads", "unregister_plugin",
]
