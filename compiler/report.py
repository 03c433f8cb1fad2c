"""``qiao report``: merge ``qiao bench`` results from many machines into Markdown tables and PNG
plots.

Each result file is checked against the schema version this qiao reads (``qiao.compiler.bench``); an
unknown version is refused rather than misread. The report has one row per (model, target, size,
machine): qiao's median latency, each baseline's, the speed-ups, throughput, and, where the result
carries FLOPs and bytes estimates, the arithmetic intensity and attained GFLOP/s for a
roofline-style plot (with the machine's measured ceilings when ``qiao bench`` recorded them).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qiao.compiler.bench import check_result, format_rate, format_seconds
from qiao.compiler.errors import QiaoError

REPORT = "report.md"
LATENCY_PNG = "latency.png"
SPEEDUP_PNG = "speedup.png"
ROOFLINE_PNG = "roofline.png"


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read result files (a directory stands for its ``*.json`` files); each is schema-checked.

    Each returned document gains ``"_path"``, the file it came from."""
    files: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        else:
            files.append(path)
    if not files:
        raise QiaoError(
            "no result files given. fix: pass files written by `qiao bench -o FILE`, e.g. `qiao "
            "report results/*.json -o report/`"
        )
    out = []
    for path in files:
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError as err:
            raise QiaoError(f"{path}: no such file. fix: check the path") from err
        except (OSError, ValueError, RecursionError) as err:  # JSON, UTF-8, nesting
            raise QiaoError(
                f"{path} is not readable JSON ({type(err).__name__}: {err}). fix: pass files "
                "written by `qiao bench -o`"
            ) from err
        out.append(dict(check_result(doc, path), _path=path))
    return out


@dataclass
class Row:
    """One (machine, model, target, size) measurement, flattened for tables and plots."""

    machine: str
    model: str
    target: str
    arch: str | None
    size_name: str
    size: int | None
    qiao_median: float
    baselines: dict[str, float] = field(default_factory=dict)  # engine → median seconds
    speedup: dict[str, float] = field(default_factory=dict)
    throughput: str = ""
    flops: int | None = None
    bytes: int | None = None
    ok: bool = True
    roofs: Mapping[str, Any] | None = None

    @property
    def series(self) -> str:
        """Legend name of the (machine, target) this row belongs to."""
        return f"{self.machine} · {self.where}"

    @property
    def where(self) -> str:
        """``target:arch`` (just the target when no arch is recorded)."""
        return self.target + (f":{self.arch}" if self.arch else "")

    @property
    def intensity(self) -> float | None:
        return self.flops / self.bytes if self.flops and self.bytes else None

    @property
    def gflops(self) -> float | None:
        return self.flops / self.qiao_median / 1e9 if self.flops else None


def _rate(thr: Mapping[str, float]) -> str:
    if "tokens_per_s" in thr:
        return format_rate(thr["tokens_per_s"], "tok")
    return format_rate(thr["samples_per_s"], "samples")


def flatten(results: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Every case of every result as a ``Row``, sorted by model, target, size, machine."""
    rows = []
    for doc in results:
        model = (doc.get("model") or {}).get("name") or "?"
        roofs = {(t["target"], t.get("arch")): t.get("roofs") for t in doc["targets"]}
        for case in doc["cases"]:
            size_name, size = next(iter(case["size"].items()), ("static", None))
            qiao = case["engines"]["qiao"]
            rows.append(
                Row(
                    machine=doc.get("label") or doc["machine"].get("hostname", "?"),
                    model=model,
                    target=case["target"],
                    arch=case.get("arch"),
                    size_name=size_name,
                    size=size,
                    qiao_median=qiao["latency_s"]["median"],
                    baselines={
                        n: e["latency_s"]["median"]
                        for n, e in case["engines"].items()
                        if n != "qiao"
                    },
                    speedup=dict(case["speedup"]),
                    throughput=_rate(qiao["throughput"]),
                    flops=case.get("flops"),
                    bytes=case.get("bytes"),
                    ok=all(c.get("ok") for c in case["check"].values()),
                    roofs=roofs.get((case["target"], case.get("arch"))),
                )
            )
    rows.sort(key=lambda r: (r.model, r.target, r.size_name, r.size or 0, r.machine))
    return rows


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def markdown(
    results: Sequence[Mapping[str, Any]], rows: Sequence[Row], plots: Sequence[str]
) -> str:
    """The report text: machines, latency and speed-up table, roofline table, unmeasured targets."""
    lines = [
        "# qiao benchmark report",
        "",
        f"{len(results)} result file(s), generated {time.strftime('%Y-%m-%d %H:%M')}. Latencies "
        "are medians per call; speed-up = baseline median / qiao median (>1: qiao is faster). "
        "FLOPs and bytes are estimates from the ONNX graph (see each result's "
        "`settings.definitions`).",
        "",
        "## Machines",
        "",
    ]
    machines = []
    for doc in results:
        m, sw = doc["machine"], doc["software"]
        gpus = ", ".join(f"{g.get('name')} (driver {g.get('driver')})" for g in m.get("gpus") or [])
        remote = "; ".join(
            f"rpc {t['remote'].get('key')}: "
            f"{t['remote'].get('device_name') or t['remote'].get('llvm_cpu')}"
            for t in doc["targets"]
            if t.get("remote")
        )
        cpu = m.get("cpu") or {}
        machines.append(
            [
                doc.get("label") or m.get("hostname", "?"),
                f"{cpu.get('model')} ({cpu.get('cores_usable')} cores)",
                gpus or remote or "-",
                (m.get("os") or {}).get("platform", "?"),
                str(sw.get("qiao")),
                str(sw.get("apache-tvm")),
                str(sw.get("onnxruntime")),
                str(sw.get("torch")),
                os.path.basename(doc.get("_path", "")),
            ]
        )
    lines += _table(
        ["machine", "CPU", "GPU / remote", "OS", "qiao", "TVM", "ORT", "torch", "file"], machines
    )
    baselines = sorted({b for r in rows for b in r.baselines})
    lines += ["", "## Latency and speed-up", ""]
    body = []
    for r in rows:
        size = f"{r.size_name}={r.size}" if r.size is not None else "static"
        body.append(
            [
                r.model,
                r.where,
                size,
                r.machine,
                format_seconds(r.qiao_median) + ("" if r.ok else " ⚠ mismatch"),
            ]
            + [format_seconds(r.baselines.get(b)) for b in baselines]
            + [f"×{r.speedup[b]:.2f}" if b in r.speedup else "-" for b in baselines]
            + [r.throughput]
        )
    lines += _table(
        ["model", "target", "size", "machine", "qiao"]
        + baselines
        + [f"speed-up vs {b}" for b in baselines]
        + ["qiao throughput"],
        body,
    )
    roof_rows = [r for r in rows if r.intensity is not None]
    if roof_rows:
        lines += ["", "## Roofline view (estimates)", ""]
        lines += _table(
            [
                "model",
                "target",
                "size",
                "machine",
                "GFLOP",
                "MB",
                "FLOP/byte",
                "qiao GFLOP/s",
                "ceiling GFLOP/s",
            ],
            [
                [
                    r.model,
                    r.where,
                    f"{r.size_name}={r.size}" if r.size is not None else "static",
                    r.machine,
                    f"{r.flops / 1e9:.4g}",
                    f"{r.bytes / 1e6:.4g}",
                    f"{r.intensity:.3g}",
                    f"{r.gflops:.4g}",
                    _ceiling(r),
                ]
                for r in roof_rows
            ],
        )
    skipped = [
        f"- {doc.get('label')}: {t['target']} ({t.get('arch')}): {t.get('status')}; "
        + "; ".join(t.get("notes", []))
        for doc in results
        for t in doc["targets"]
        if t.get("status") != "ok"
    ]
    notes = sorted(
        {
            f"- {doc.get('label')}: {n}"
            for doc in results
            for t in doc["targets"]
            if t.get("status") == "ok"
            for n in t.get("notes", [])
        }
    )
    if skipped:
        lines += ["", "## Not measured", ""] + skipped
    if notes:
        lines += ["", "## Notes", ""] + notes
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _ceiling(row: Row) -> str:
    roofs = row.roofs
    if not roofs or row.intensity is None:
        return "-"
    return f"{min(roofs['peak_gflops'], roofs['bandwidth_gbs'] * row.intensity):.4g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, count: int):
    cols = min(3, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _x(row: Row, index: int) -> float:
    return float(row.size) if row.size is not None else float(index + 1)


def _model_panels(rows: Sequence[Row], path: str, title: str, ylabel: str, draw, log_base=10):
    """One panel per model, x = size (log2 when sizes exist); ``draw(ax, rows_of_model)`` plots."""
    plt = _pyplot()
    models = sorted({r.model for r in rows})
    fig, axes = _grid(plt, len(models))
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r.model == model]
        draw(ax, mine)
        ax.set_title(model)
        ax.set_xlabel(mine[0].size_name if mine[0].size is not None else "case")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log", base=log_base)
        if any(r.size for r in mine):
            ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_series(mine: Sequence[Row]) -> dict[str, list[Row]]:
    return {s: [r for r in mine if r.series == s] for s in sorted({r.series for r in mine})}


def plot_latency(rows: Sequence[Row], path: str) -> None:
    """One panel per model: median latency against size, a line per (machine, target, engine)."""

    def draw(ax, mine):
        engines = ["qiao"] + sorted({b for r in mine for b in r.baselines})
        for series, points in _by_series(mine).items():
            for engine in engines:
                xy = [
                    (_x(r, i), r.qiao_median if engine == "qiao" else r.baselines.get(engine))
                    for i, r in enumerate(points)
                ]
                xy = [(x, y * 1e3) for x, y in xy if y is not None]
                if xy:
                    style = "-o" if engine == "qiao" else "--."
                    ax.plot(*zip(*xy), style, label=f"{series} · {engine}")

    _model_panels(rows, path, "Latency per call (lower is better)", "median latency (ms)", draw)


def plot_speedup(rows: Sequence[Row], path: str) -> None:
    """One panel per model: qiao's speed-up over each baseline against size (1 = parity)."""

    def draw(ax, mine):
        for series, points in _by_series(mine).items():
            for baseline in sorted({b for r in points for b in r.speedup}):
                xy = [
                    (_x(r, i), r.speedup[baseline])
                    for i, r in enumerate(points)
                    if baseline in r.speedup
                ]
                ax.plot(*zip(*xy), "-o", label=f"{series} vs {baseline}")
        ax.axhline(1.0, color="black", linewidth=0.8)

    _model_panels(
        rows,
        path,
        "qiao speed-up over baselines (above 1: qiao is faster)",
        "speed-up (baseline / qiao)",
        draw,
        log_base=2,
    )


def plot_roofline(rows: Sequence[Row], path: str) -> None:
    """Attained GFLOP/s against arithmetic intensity (estimates), with measured ceilings."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    points = [r for r in rows if r.intensity is not None]
    markers = "osD^v<>ph*"
    models = sorted({r.model for r in points})
    colors = {s: f"C{i % 10}" for i, s in enumerate(sorted({r.series for r in points}))}
    for r in points:
        ax.scatter(
            r.intensity,
            r.gflops,
            color=colors[r.series],
            marker=markers[models.index(r.model) % len(markers)],
        )
    lo = min(r.intensity for r in points) / 4
    hi = max(r.intensity for r in points) * 4
    xs = np.geomspace(lo, hi, 200)
    for series, color in colors.items():
        roofs = next((r.roofs for r in points if r.series == series and r.roofs), None)
        if roofs:
            ax.plot(
                xs,
                np.minimum(roofs["peak_gflops"], roofs["bandwidth_gbs"] * xs),
                color=color,
                linewidth=1,
                alpha=0.7,
            )
    for series, color in colors.items():
        ax.plot([], [], color=color, marker="o", linestyle="", label=series)
    for i, model in enumerate(models):
        ax.plot([], [], color="gray", marker=markers[i % len(markers)], linestyle="", label=model)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, estimate)")
    ax.set_ylabel("qiao attained GFLOP/s (estimate)")
    ax.set_title("Roofline view (lines: measured CPU ceilings where recorded)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> dict[str, str]:
    """Write ``report.md`` and the PNG plots into ``out_dir``; returns ``{kind: path}``.

    Parameters
    ----------
    results : list of dict
        Result documents (``load_results``), from any number of machines.
    out_dir : str
        Created if missing; existing report files in it are replaced.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = flatten(results)
    written: dict[str, str] = {}
    plots = []
    if rows:
        for kind, name, plot in (
            ("latency", LATENCY_PNG, plot_latency),
            ("speedup", SPEEDUP_PNG, plot_speedup),
        ):
            if kind == "speedup" and not any(r.speedup for r in rows):
                continue
            plot(rows, os.path.join(out_dir, name))
            written[kind] = os.path.join(out_dir, name)
            plots.append(name)
        if any(r.intensity is not None for r in rows):
            plot_roofline(rows, os.path.join(out_dir, ROOFLINE_PNG))
            written["roofline"] = os.path.join(out_dir, ROOFLINE_PNG)
            plots.append(ROOFLINE_PNG)
    path = os.path.join(out_dir, REPORT)
    with open(path, "w") as f:
        f.write(markdown(results, rows, plots))
    written["markdown"] = path
    return written
