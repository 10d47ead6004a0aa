"""kdist: snapshots, uploader, restorer, CLI and distributed backup on top of repo_format."""

__version__ = "0.1.0"
