"""`moeray shards` reaches moeray.shards through the main command."""

from __future__ import annotations

import pytest

from moeray import cli
from moeray.shards import ShardStore


@pytest.mark.pure
def test_moeray_shards_synth_then_info(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert (
        cli.main(
            [
                "shards",
                "synth",
                "--shape",
                "qwen1.5-moe",
                "--layers",
                "2",
                "--scale",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with ShardStore(out) as store:
        assert store.layers == (0, 1)
        assert store.num_experts(0) == 60  # Qwen1.5-MoE's routed experts
    assert cli.main(["shards", "info", str(out)]) == 0
    assert "2 MoE layers" in capsys.readouterr().out
    assert cli.main(["shards", "info", str(tmp_path / "missing")]) == 2
