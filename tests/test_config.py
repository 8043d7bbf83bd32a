from __future__ import annotations

import argparse

import pytest

from meshserve.common.config import RouterConfig, WorkerConfig, add_arguments, from_args


def parse(config_type, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, config_type)
    return from_args(config_type, parser.parse_args(argv))


def test_flag_beats_environment_beats_default(monkeypatch):
    assert parse(WorkerConfig, []).max_num_seqs == 32
    monkeypatch.setenv("MESHSERVE_MAX_NUM_SEQS", "4")
    assert parse(WorkerConfig, []).max_num_seqs == 4
    assert parse(WorkerConfig, ["--max-num-seqs", "2"]).max_num_seqs == 2


def test_each_service_has_its_own_default_port():
    assert parse(WorkerConfig, []).port == 50061
    assert parse(RouterConfig, ["--workers", "a:1,b:2"]).workers == "a:1,b:2"
    assert parse(RouterConfig, []).port == 50052


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MESHSERVE_PORT", "fifty")
    with pytest.raises(SystemExit, match="MESHSERVE_PORT"):
        parse(RouterConfig, [])
