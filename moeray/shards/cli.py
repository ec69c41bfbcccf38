"""``moeray shards``: synthetic checkpoints and a look inside real ones.

Wired into ``moeray.cli`` by ``add_parser(commands)`` and ``run(args)``; also runs alone as
``python -m moeray.shards.cli``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "main", "run"]

_SYNTH_EPILOG = """\
shapes (per expert; each from the model's config.json):
  gpt-oss-20b       24 layers, 32 experts, hidden 2880, intermediate 2880, stacked gate_up_proj
  mixtral-8x7b      32 layers,  8 experts, hidden 4096, intermediate 14336
  deepseek-v2-lite  27 layers (layer 0 dense), 64 experts + 2 shared, hidden 2048, intermediate 1408
  qwen1.5-moe       24 layers, 60 experts + 1 shared, hidden 2048, intermediate 1408
  custom            --num-experts, --hidden-size, --intermediate-size and --naming

examples:
  moeray shards synth --shape mixtral-8x7b --layers 2 --scale 32 --out mixtral         # 5.3 MiB
  moeray shards synth --shape gpt-oss-20b --layers 4 --scale 8 --dtype ternary --out gpt-oss-t
  moeray shards synth --shape custom --num-experts 8 --hidden-size 64 \\
      --intermediate-size 128 --naming mlp --layers 2 --out tiny
  moeray shards info mixtral

Weights are random (normal, std 1/sqrt(fan_in)); names, shapes and file layout are the real
family's. One file per --layers-per-file layers, with model.safetensors.index.json when there
are several. ternary is ruvllm's packed format (2-bit weights, one float32 scale per block).
Before writing, synth prints on stderr the bytes it will write, and it refuses a checkpoint
larger than the free space where it goes: at full size (--scale 1) one gpt-oss-20b layer is
1.5 GiB, one Mixtral-8x7B layer 2.6 GiB.
"""


def add_parser(commands) -> argparse.ArgumentParser:
    """Adds ``shards`` (with ``synth`` and ``info``) to the subparsers ``commands``."""
    from moeray.shards.synth import DTYPES, MODEL_SHAPES, NAMINGS
    from moeray.shards.ternary import DEFAULT_BLOCK_SIZE

    shards = commands.add_parser(
        "shards",
        help="write synthetic expert-weight checkpoints, or describe one",
        description="Expert weight shards: safetensors checkpoints mapped per (layer, expert).",
    )
    actions = shards.add_subparsers(dest="shards_command", required=True, metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        help="write a checkpoint with a real MoE family's tensor names and shapes, random weights",
        description="Writes a safetensors checkpoint with the tensor names and per-expert shapes "
        "of a real MoE family and random weights, small enough for tests with --layers/--scale.",
        epilog=_SYNTH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    synth.add_argument(
        "--shape",
        required=True,
        choices=(*MODEL_SHAPES, "custom"),
        help="model family whose names and shapes to copy",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    synth.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help="write the first N layers (default: all of the family's)",
    )
    synth.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bf16",
        help="expert weight format (default bf16; ternary: ruvllm packed 2-bit)",
    )
    synth.add_argument(
        "--scale",
        type=int,
        default=1,
        metavar="N",
        help="divide hidden and intermediate sizes by N, kept multiples of 4 "
        "(default 1: the real sizes)",
    )
    synth.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="B",
        help=f"ternary weights per float32 scale (default {DEFAULT_BLOCK_SIZE})",
    )
    synth.add_argument(
        "--layers-per-file",
        type=int,
        default=1,
        metavar="N",
        help="layers per .safetensors file (default 1)",
    )
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--num-experts", type=int, metavar="E", help="custom: experts per layer")
    synth.add_argument("--hidden-size", type=int, metavar="H", help="custom: hidden size")
    synth.add_argument(
        "--intermediate-size", type=int, metavar="I", help="custom: intermediate size of one expert"
    )
    synth.add_argument(
        "--naming",
        choices=NAMINGS,
        default="mlp",
        help="custom: mixtral (w1/w2/w3), mlp (gate_proj/up_proj/down_proj) or "
        "stacked (gpt-oss gate_up_proj) (default mlp)",
    )
    synth.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    info = actions.add_parser(
        "info",
        help="list a checkpoint's MoE layers: experts, format, sizes and bytes",
        description="Opens a checkpoint directory (or .safetensors file) as moeray's shard store "
        "and prints one line per MoE layer.",
    )
    info.add_argument("path", help="checkpoint directory or .safetensors file")
    return shards


def run(args: argparse.Namespace) -> int:
    """Runs a parsed ``shards`` command; ValueError (ShardFormatError included) on bad input."""
    if args.shards_command == "synth":
        return _synth(args)
    return _info(args)


def _model_shape(args):
    from moeray.shards.synth import MODEL_SHAPES, ModelShape

    custom = {
        "--num-experts": args.num_experts,
        "--hidden-size": args.hidden_size,
        "--intermediate-size": args.intermediate_size,
    }
    if args.shape != "custom":
        given = [flag for flag, value in custom.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --shape custom")
        return MODEL_SHAPES[args.shape]
    missing = [flag for flag, value in custom.items() if value is None]
    if missing:
        raise ValueError(f"--shape custom needs {', '.join(missing)}")
    return ModelShape(
        "custom",
        args.naming,
        args.layers or 1,
        args.num_experts,
        args.hidden_size,
        args.intermediate_size,
    )


def _synth(args) -> int:
    from moeray.shards.synth import (
        SynthConfig,
        check_free_space,
        format_bytes,
        free_bytes_for,
        plan_checkpoint,
        write_checkpoint,
    )

    shape = _model_shape(args).scaled(args.scale)
    config = SynthConfig(
        shape,
        args.layers if args.layers is not None else shape.num_layers,
        args.dtype,
        args.block_size,
        args.layers_per_file,
        args.seed,
    )
    plan = plan_checkpoint(config)
    # stated before anything is written: a full-size family is tens of GiB
    check_free_space(plan.total_bytes, free_bytes_for(plan, args.out), args.out)
    print(
        f"moeray shards synth: writing {len(plan.names)} file(s), "
        f"{format_bytes(plan.total_bytes)}, to {args.out}",
        file=sys.stderr,
        flush=True,
    )
    written = write_checkpoint(config, args.out, progress=args.progress)
    print(
        f"wrote {written.path}: {shape.name} ({args.dtype}), {config.num_layers} layers x "
        f"{shape.num_experts} experts, hidden {shape.hidden_size}, intermediate "
        f"{shape.intermediate_size}; {len(plan.names)} file(s), {format_bytes(plan.total_bytes)}"
    )
    return 0


def _info(args) -> int:
    from moeray.shards.store import ShardStore

    with ShardStore(args.path) as store:
        print(f"{store.path}: {len(store.files)} file(s), {len(store.layers)} MoE layers")
        print(
            f"{'layer':>5}{'experts':>9}{'layout':>9}{'format':>9}{'hidden':>8}"
            f"{'interm.':>9}{'expert MiB':>12}{'layer MiB':>11}"
        )
        for layer in store.layers:
            spec = store.layer_spec(layer)
            print(
                f"{layer:>5}{spec.num_experts:>9}{spec.layout:>9}{spec.format:>9}"
                f"{spec.hidden_size:>8}{spec.intermediate_size:>9}"
                f"{store.expert_bytes(layer, 0) / 2**20:>12.3f}"
                f"{store.layer_bytes(layer) / 2**20:>11.2f}"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeray")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        print(f"moeray shards: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
