"""Fails on import, like a plugin whose native dependency is missing."""

import qiao_missing_native_dependency  # noqa: F401  (does not exist)
