"""Direct tests of the scripts of ``lua/``: one module per script."""
