"""List every backend: vendor, device presets and what works on this machine."""

from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(args) -> int:
    from qiao.backends import list_backends

    rows = []
    for entry, backend, error in list_backends():
        if backend is None:
            rows.append(
                {
                    "name": entry.name,
                    "vendor": "?",
                    "source": entry.dist,
                    "presets": [],
                    "status": f"broken plugin: {error}",
                }
            )
            continue
        try:
            status = backend.availability().status
            presets = [f"{p.name} ({p.description})" for p in backend.presets().values()]
        except Exception as err:  # a plugin's probe or presets must not break the listing
            status = f"broken plugin: {type(err).__name__}: {err}"
            presets = []
        rows.append(
            {
                "name": entry.name,
                "vendor": backend.vendor,
                "source": entry.dist,
                "presets": presets,
                "default": backend.default_preset,
                "status": status,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        origin = "" if r["source"] == "qiao" else f" [plugin: {r['source']}]"
        print(f"{r['name']}  —  {r['vendor']}{origin}")
        print(f"    status: {r['status']}")
        for p in r["presets"]:
            print(f"    --arch {p}")
    return 0
