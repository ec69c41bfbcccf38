"""`moeray shards` reaches moeray.shards through the main command; `synth` states the bytes
it writes before writing and refuses more than the free disk space."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from moeray import cli
from moeray.shards import ShardStore, synth
from moeray.shards.synth import (
    MODEL_SHAPES,
    SynthConfig,
    check_free_space,
    free_bytes_for,
    plan_checkpoint,
    write_checkpoint,
)


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


# -- the bytes synth writes: stated before writing, refused beyond the free space ----------------
@pytest.mark.pure
@pytest.mark.parametrize(
    "shape, dtype, layers_per_file",
    [
        ("gpt-oss-20b", "bf16", 1),
        ("gpt-oss-20b", "ternary", 2),
        ("mixtral-8x7b", "f32", 1),
        ("deepseek-v2-lite", "f16", 2),
        ("qwen1.5-moe", "ternary", 1),
    ],
)
def test_plan_is_the_bytes_on_disk(tmp_path, shape, dtype, layers_per_file):
    config = SynthConfig(
        MODEL_SHAPES[shape].scaled(64),
        num_layers=3,
        dtype=dtype,
        block_size=64,
        layers_per_file=layers_per_file,
    )
    plan = plan_checkpoint(config)
    written = write_checkpoint(config, tmp_path)
    on_disk = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert sorted(on_disk) == sorted(plan.names)
    assert [on_disk[name] for name in plan.files] == list(plan.file_bytes)
    assert sum(on_disk.values()) == plan.total_bytes
    assert written.total_bytes == plan.tensor_bytes


@pytest.mark.pure
def test_plan_of_a_full_size_family_allocates_nothing():
    plan = plan_checkpoint(SynthConfig(MODEL_SHAPES["gpt-oss-20b"], num_layers=24))
    # 24 layers of 32 experts, gate_up [2880, 5760] and down [2880, 2880] in bf16: 35.6 GiB
    assert plan.tensor_bytes > 24 * 32 * (2880 * 5760 + 2880 * 2880) * 2
    assert round(plan.total_bytes / 2**30, 1) == 35.6 and len(plan.names) == 25


@pytest.mark.pure
def test_free_space_check_names_both_numbers():
    check_free_space(1000, 1000, "ckpt")  # fits exactly
    with pytest.raises(ValueError) as raised:
        check_free_space(599_439_390, 1_048_576, "ckpt")
    message = str(raised.value)
    assert "\n" not in message
    assert "599,439,390 bytes (571.7 MiB)" in message and "1,048,576 bytes (1.0 MiB)" in message


@pytest.mark.pure
def test_free_space_counts_the_files_a_rewrite_replaces(tmp_path, monkeypatch):
    config = SynthConfig(MODEL_SHAPES["mixtral-8x7b"].scaled(64), num_layers=2)
    plan = plan_checkpoint(config)
    write_checkpoint(config, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("not the checkpoint's: stays")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage._replace(free=0))
    assert free_bytes_for(plan, tmp_path / "ckpt") == plan.total_bytes
    assert free_bytes_for(plan, tmp_path / "new" / "deeper") == 0  # its nearest existing parent


@pytest.mark.pure
def test_synth_refuses_more_than_the_free_space(tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda path: usage._replace(free=2_000_000))
    out = tmp_path / "ckpt"
    # 5.3 MiB against 1.9 MiB free: a regression would write little
    argv = ["shards", "synth", "--shape", "mixtral-8x7b", "--layers", "2", "--scale", "32"]
    argv += ["--out", str(out)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("moeray shards: error: ") and "\n" not in error
    assert "5,520,102 bytes (5.3 MiB)" in error and "2,000,000 bytes (1.9 MiB)" in error
    assert not out.exists()  # refused before anything was written
    with pytest.raises(ValueError, match="2,000,000 bytes"):  # the library refuses too
        write_checkpoint(SynthConfig(MODEL_SHAPES["mixtral-8x7b"].scaled(32), num_layers=2), out)


def test_moeray_shards_synth_states_the_bytes_before_writing(tmp_path):
    """The real command, outside the checkout: one stderr line with the files and bytes."""
    proc = subprocess.run(
        ["moeray", "shards", "synth", "--shape", "mixtral-8x7b", "--layers", "2"]
        + ["--scale", "32", "--out", "mixtral"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    on_disk = sum(p.stat().st_size for p in (tmp_path / "mixtral").iterdir())
    assert proc.stderr.strip() == (
        f"moeray shards synth: writing 3 file(s), {on_disk:,} bytes (5.3 MiB), to mixtral"
    )
    assert f"{on_disk:,} bytes (5.3 MiB)" in proc.stdout
