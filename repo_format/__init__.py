"""repo_format: the kdist repository format library.

Stores deduplicated, compressed, encrypted contents in immutable blobs and reads them back.
It never imports ``kdist``; everything above (snapshots, CLI, GC, Ray) builds on it.
The format itself is documented in ``repo_format/SPEC.md``.
"""
