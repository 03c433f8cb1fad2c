"""Token generation (issue 12): qiao's ``Generator`` vs ONNX Runtime GenAI (same ONNX folder) vs
transformers' ``generate`` (same weights; greedy, float32, eager, KV cache) on a dense Qwen3 at
Qwen3-0.6B's dimensions and a 2-layer Qwen3-MoE at Qwen3-30B-A3B's, random weights, batch 1, with
``qiao.compiler.bench.generate`` (each engine in its own process, so peak memory is its own).

    python benchmarks/test_generate.py                       # full table and floors, ~15-25 min
    python benchmarks/test_generate.py --dense DIR --moe DIR  # on artifacts compiled before
    QIAO_BENCH_SMOKE=1 python -m pytest -q benchmarks/test_generate.py   # small models (CI)
    python -m pytest -q benchmarks/test_generate.py -s       # full, floors asserted

The floors of issue 12, as ratios measured in one run: decode tokens/s >= ONNX Runtime GenAI's and
>= 3x transformers' on both models; time to first token <= ONNX Runtime GenAI's at prompt 128; for
the MoE model, qiao's time per output token at past 2048 <= 1.5x its time at past 16. Every
baseline's greedy tokens must equal qiao's (never the speed of a wrong answer). Smoke mode runs
qwen3-small and qwen3-moe-small with short prompts, every engine in this process, and checks that
everything runs and agrees; it asserts no ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

from qiao.compiler.bench.generate import bench_generate, format_generate

MODELS = {"dense": "qwen3-0.6b", "moe": "qwen3-30b-a3b-2l"}
SMOKE_MODELS = {"dense": "qwen3-small", "moe": "qwen3-moe-small"}
FULL = dict(prompt_len=128, new_tokens=128, runs=3, past=(16, 2048), past_tokens=17)
SMOKE = dict(prompt_len=8, new_tokens=4, runs=1, past=(16, 32), past_tokens=3)
TPS_VS_ORT = 1.0  # qiao tokens/s >= this x ONNX Runtime GenAI's
TPS_VS_TRANSFORMERS = 3.0
TTFT_VS_ORT = 1.0  # qiao TTFT <= this x ONNX Runtime GenAI's
PAST_GROWTH = 1.5  # MoE: TPOT(past 2048) <= this x TPOT(past 16)


def is_smoke() -> bool:
    return os.environ.get("QIAO_BENCH_SMOKE") == "1"


def run_model(kind: str, smoke: bool, source: str | None = None, progress=None) -> dict:
    """The main case on every engine and, for the MoE model, qiao's decode steps at each past."""
    sizes = SMOKE if smoke else FULL
    source = source or (SMOKE_MODELS if smoke else MODELS)[kind]
    common = dict(isolate=not smoke, roofs=not smoke, progress=progress)
    main = bench_generate(
        source,
        prompt_len=sizes["prompt_len"],
        new_tokens=sizes["new_tokens"],
        runs=sizes["runs"],
        **common,
    )
    past = None
    if kind == "moe":
        past = bench_generate(
            main["targets"][0]["artifact"],  # the artifact compiled above
            engines=("qiao",),
            batch=(),  # no prompt-length case: only the past lengths
            past=sizes["past"],
            past_tokens=sizes["past_tokens"],
            **common,
        )
    return {"kind": kind, "main": main, "past": past}


def _engine(doc: dict, name: str, key: str = "prompt_len") -> dict | None:
    case = next(c for c in doc["cases"] if key in c["size"])
    return case["engines"].get(name)


def check_failures(result: dict) -> list[str]:
    """Engines that did not run, and baselines whose greedy tokens differ from qiao's."""
    bad = list(result["main"]["targets"][0]["notes"])
    for case in result["main"]["cases"]:
        for name in ("qiao", "ort-genai", "transformers"):
            if name not in case["engines"]:
                bad.append(f"{name} did not run")
        bad += [
            f"{name} tokens differ from qiao's (common prefix {check['matching']})"
            for name, check in case["check"].items()
            if not check["ok"]
        ]
    if result["past"] is not None:
        bad += list(result["past"]["targets"][0]["notes"])
    return bad


def floor_failures(result: dict) -> list[str]:
    """The issue's floors (see the module docstring) that this run misses."""
    main, kind = result["main"], result["kind"]
    qiao, ort = _engine(main, "qiao"), _engine(main, "ort-genai")
    hf = _engine(main, "transformers")
    bad = []
    tps = qiao["throughput"]["tokens_per_s"]
    if tps < TPS_VS_ORT * ort["throughput"]["tokens_per_s"]:
        bad.append(
            f"{kind}: {tps:.2f} tokens/s < ORT GenAI {ort['throughput']['tokens_per_s']:.2f}"
        )
    if tps < TPS_VS_TRANSFORMERS * hf["throughput"]["tokens_per_s"]:
        bad.append(
            f"{kind}: {tps:.2f} tokens/s < {TPS_VS_TRANSFORMERS} x transformers "
            f"{hf['throughput']['tokens_per_s']:.2f}"
        )
    if qiao["ttft_s"] > TTFT_VS_ORT * ort["ttft_s"]:
        bad.append(
            f"{kind}: TTFT {qiao['ttft_s'] * 1e3:.1f} ms > ORT GenAI {ort['ttft_s'] * 1e3:.1f} ms"
        )
    if result["past"] is not None:
        tpot = {c["size"]["past"]: c["engines"]["qiao"]["tpot_s"] for c in result["past"]["cases"]}
        short, long = tpot[min(tpot)], tpot[max(tpot)]
        if long > PAST_GROWTH * short:
            bad.append(
                f"{kind}: TPOT at past {max(tpot)} {long * 1e3:.2f} ms > {PAST_GROWTH} x TPOT at "
                f"past {min(tpot)} {short * 1e3:.2f} ms"
            )
    return bad


def format_run(result: dict) -> str:
    text = format_generate(result["main"])
    if result["past"] is not None:
        lines = [f"qiao time per output token by past length ({result['kind']}):"]
        for case in result["past"]["cases"]:
            timed = case["engines"]["qiao"]
            lines.append(
                f"  past {case['size']['past']:>5}: TPOT {timed['tpot_s'] * 1e3:.2f} ms "
                f"(median of {timed['latency_s']['n']} steps)"
            )
        text += "\n" + "\n".join(lines)
    return text


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generate_floors(kind):
    """Every engine runs and agrees with qiao; in full mode the floors hold."""
    result = run_model(kind, is_smoke())
    print("\n" + format_run(result))
    failures = check_failures(result)
    assert not failures, "; ".join(failures)
    if not is_smoke():
        failures = floor_failures(result)
        assert not failures, "; ".join(failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", default=None, help="dense decoder source (default qwen3-0.6b)")
    parser.add_argument("--moe", default=None, help="MoE decoder source (default qwen3-30b-a3b-2l)")
    parser.add_argument("-o", "--output", default=None, help="write both results as JSON here")
    args = parser.parse_args(argv)
    smoke, results, failures = is_smoke(), {}, []

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for kind in ("dense", "moe"):
        result = run_model(kind, smoke, getattr(args, kind), progress=say)
        results[kind] = result
        print(format_run(result), flush=True)
        failures += check_failures(result) + ([] if smoke else floor_failures(result))
    print("floors: " + ("all met" if not failures else "; ".join(failures)))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
