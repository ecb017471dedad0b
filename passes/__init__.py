"""Built-in passes, importable as `edgegraph.passes`. Importing a module registers its passes."""

from importlib import import_module

# One module per pass family; add new families here. A missing one is an error, not a skip:
# a broken install must not quietly lose a pass.
BUILTIN_MODULES = (
    "cleanup", "equalize", "quant", "quant.dynamic", "quant.weight_only", "framecache", "legalize", "prune", "codebook",
    "sparsify",
)

for _module in BUILTIN_MODULES:
    import_module(f"edgegraph.passes.{_module}")
