"""kernel_provider: a QNTX Python provider that runs each py glyph on its own Jupyter kernel."""
