"""kdist.gc: lock-free repository maintenance (imported as ``kdist.gc``; the folder is ``gc/``)."""

# What a maintenance run's plans hold in memory at once (``--memory-limit``); here, where the CLI
# can read it without importing the planners (and numpy) into every command.
DEFAULT_MEMORY_LIMIT = 256 * 2**20
