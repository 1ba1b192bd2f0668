"""The built-in architecture plugins, one module per family, loaded through the
``torchless`` entry-point group exactly like third-party plugins."""
