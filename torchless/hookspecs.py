"""The hooks a torchless plugin may implement.

A plugin is a module (or object) with functions decorated by ``torchless.hookimpl``, made
known through the ``torchless`` entry-point group::

    [project.entry-points.torchless]
    mymodel = "my_package.torchless_plugin"

The built-in families are loaded exactly the same way.
"""
import pluggy

hookspec = pluggy.HookspecMarker("torchless")
hookimpl = pluggy.HookimplMarker("torchless")


@hookspec
def register_architectures(register):
    """Register architecture variants.

    Call ``register(spec)`` once per :class:`torchless.ArchitectureSpec` the plugin provides.
    A spec names its family and variant, how to detect it (config ``model_type`` and
    ``architectures``, GGUF ``general.architecture``, a tensor-name pattern), how to translate
    its config into a :class:`torchless.ModelConfig`, how its checkpoint names its tensors,
    and (optionally) a model class whose forward differs from the shared decoder.
    """
