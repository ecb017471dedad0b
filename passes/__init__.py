"""Built-in passes, importable as `edgegraph.passes`. Importing a module registers its passes."""

from importlib import import_module

# One module per pass family; add new families here.
for _module in ("cleanup", "equalize", "quant", "quant.dynamic", "quant.weight_only"):
    try:
        import_module(f"edgegraph.passes.{_module}")
    except ModuleNotFoundError as _exc:  # a family still being written
        if _exc.name != f"edgegraph.passes.{_module}":
            raise
