"""Compile options are one typed object, checked before any work: a misspelt name or a value of
the wrong kind is an error listing what is valid, never silently ignored."""

from __future__ import annotations

import dataclasses

import pytest

from qiao.compiler import compile
from qiao.compiler.errors import QiaoError
from qiao.compiler.options import CompileOptions


def test_unknown_option_is_an_error_listing_the_valid_ones(tmp_path):
    with pytest.raises(QiaoError, match=r"unknown compile option 'dumpir'.*fix:.*dump_ir"):
        compile("mlp", "cpu", tmp_path / "art", dumpir=str(tmp_path / "ir"))
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"trials": "3"},
        {"trials": 0},
        {"tune": "yes"},
        {"initializer_inputs": "weights"},
        {"tune_dims": {"seq": -1}},
        {"static_dims": {"batch": 2.5}},
        {"dim_ranges": {"seq": (8, 1)}},
        {"moe_schedule": 4},
    ],
)
def test_values_of_the_wrong_kind_are_errors(bad):
    (name,) = bad
    with pytest.raises(QiaoError, match=rf"compile option {name}=.*fix:"):
        CompileOptions.from_kwargs(bad)


def test_options_read_as_a_mapping_of_what_is_set():
    opts = CompileOptions.from_kwargs(tune=True, trials=4, tune_dims={"seq": 128})
    assert opts.get("trials") == 4 and opts["tune"] is True and opts.tune_dims == {"seq": 128}
    assert "dump_ir" not in opts and opts.get("dump_ir") is None
    assert set(opts) == {"initializer_inputs", "tune", "trials", "tune_dims", "use_tuning_db"}
    again = CompileOptions.from_kwargs(opts, moe_schedule={"block_m": 8})
    assert again.moe_schedule == {"block_m": 8} and again.trials == 4 and opts.moe_schedule is None
    with pytest.raises(dataclasses.FrozenInstanceError):  # callers cannot mutate a shared object
        opts.trials = 9  # type: ignore[misc]


def test_valid_options_compile(tmp_path):
    art = compile("mlp", "cpu", tmp_path / "art", dump_ir=str(tmp_path / "ir"), use_tuning_db=False)
    assert art.manifest["backend"]["name"] == "cpu" and any((tmp_path / "ir").iterdir())
