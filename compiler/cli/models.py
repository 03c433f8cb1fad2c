"""List the built-in models (names usable wherever a model path is)."""

from __future__ import annotations


def add_arguments(p):
    pass


def main(args) -> int:
    from qiao.models import list_models

    models = list_models()
    width = max(map(len, models)) if models else 0
    for name, desc in models.items():
        print(f"{name:<{width}}  {desc}")
    return 0
