"""Generated stubs are committed; they must be exactly what the protos generate."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_regenerated(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen_protos
    spec.loader.exec_module(gen_protos)
    fresh = {p.name: p.read_bytes() for p in gen_protos.generate(tmp_path / "v1")}
    committed = {p.name: p.read_bytes() for p in (ROOT / "services" / "meshserve" / "v1").iterdir() if p.is_file()}
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, f"regenerate with `python scripts/gen_protos.py`; out of date: {stale}"
