"""Converter for ``com.microsoft::MoE`` (filled by the MoE lowering)."""

from __future__ import annotations
