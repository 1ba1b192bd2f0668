"""Config activation strings -> the engine's activation names (ARCHITECTURES.md 2.4)."""
from .errors import ConfigError

_ACT = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
}


def activation_name(value: str) -> str:
    try:
        return _ACT[value]
    except KeyError:
        raise ConfigError(
            f"unsupported activation {value!r}; supported: {', '.join(sorted(_ACT))}"
        ) from None
