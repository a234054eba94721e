"""The `mt` commands that need more than a few lines: one module each (the parser is mt.cli)."""
