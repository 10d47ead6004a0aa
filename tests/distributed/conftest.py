"""Distributed tests use fast (weak) key derivation, allowed only through this variable."""

import os

os.environ.setdefault("KDIST_ALLOW_WEAK_KDF_FOR_TESTS", "1")
