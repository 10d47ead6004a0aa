"""The ``kdist`` command line: one module per command group; the logic lives in the library."""
