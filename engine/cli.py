"""`aso-se`: the command line. argparse lives here only; everything else takes a `Config`.

    aso-se search --preset fashion-mnist --out runs/fm        four phases, run directory
    aso-se search --resume runs/fm                            continue an interrupted run
    aso-se train --genotype runs/fm/genotype.json --out runs/fm-train
    aso-se eval --checkpoint runs/fm/checkpoints/last.pt
    aso-se data --dataset fashion-mnist
    aso-se profile --preset smoke --steps 5 --out runs/prof
    aso-se report runs/fm                                     runs/fm/report/index.html: curves, cells, tables
    aso-se export runs/fm --format onnx                       the trained network, loadable without ASO-SE
    aso-se latency --preset fashion-mnist --batch 1 --check 12   per-op latency table, checked on 12 networks
    torchrun --nproc_per_node=2 -m engine.cli search --preset smoke --out runs/ddp    data-parallel (engine/distributed.py)

Bad input ends with one line `aso-se: error: ...` and exit code 2; nothing already written is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import AsoseError, ConfigError
from .stopping import CHECKPOINT_EVERY_S, Stopped

# what `aso-se train` (and bench/search_quality.py) set on top of a preset: the optimize phase alone, fresh init,
# no curriculum (a search's config read back trains the data set itself)
TRAIN_ONLY = ["warmup_epochs=0", "search_epochs=0", "growth_epochs=0", "optimize_init=fresh", "curriculum=",
              "curriculum_epochs=0"]
EPILOG_FIELDS = "config fields (--set key=value): see engine/config.py or `aso-se search --list-fields`"


def _add_common(p: argparse.ArgumentParser, preset_default: str | None = "fashion-mnist") -> None:
    p.add_argument("--preset", default=preset_default, help="named config: fashion-mnist (default), cifar10, smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, repeatable (e.g. --set search_epochs=3)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--data-dir", default=None, help="data set directory (default: the data set's usual place)")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges for Nsight Systems")
    _add_skip_bad(p)


def _add_checkpoint_every(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY_S, metavar="SECONDS",
                   help=f"also write checkpoints/last.pt mid-epoch every SECONDS (default {CHECKPOINT_EVERY_S:g}; "
                        "0: after every step); epochs always end with one")


def _config(args):
    from .config import preset
    cfg = preset(args.preset)
    extra = list(args.overrides)
    if args.device is not None:
        extra.append(f"device={args.device}")
    if args.seed is not None:
        extra.append(f"seed={args.seed}")
    if args.data_dir is not None:
        extra.append(f"data_dir={args.data_dir}")
    if args.nvtx:
        extra.append("nvtx=true")
    if getattr(args, "skip_bad_images", False):
        extra.append("skip_bad_images=true")
    return cfg.override(extra)


def _check_fresh_out(out: str) -> None:
    from .trainer import holds_run
    if holds_run(out):
        raise ConfigError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")


def _check_checkpoint_every(args) -> None:
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every:g}: seconds cannot be negative (0: every step)")


def cmd_search(args) -> int:
    from .distributed import close, env_world
    from .trainer import Trainer
    _check_checkpoint_every(args)
    if args.list_fields:
        from .config import Config
        for k, v in Config().to_json().items():
            print(f"{k} = {v!r}")
        return 0
    if args.from_ and not args.resume:
        raise ConfigError("--from names a checkpoint to resume from: use it with --resume DIR")
    if args.resume:
        if args.overrides or args.out:
            raise ConfigError("--resume takes the run's own config; drop --set/--out (start a new run to change them)")
        from .config import load_config_file
        cfg = load_config_file(os.path.join(args.resume, "config.json"))
        if args.seed is not None:
            raise ConfigError("--resume takes the run's own seed; drop --seed (start a new run to change it)")
        if args.nvtx:
            cfg.nvtx = True  # profiling a resumed run changes no result
        if args.device is not None:
            cfg.device = args.device  # another device of the same kind (checked against the checkpoint)
        trainer = Trainer(cfg, args.resume, resume=args.from_ or True, stop_after=args.stop_after,
                          checkpoint_every_s=args.checkpoint_every, tensorboard=args.tensorboard)
    else:
        if not args.out:
            raise ConfigError("search needs --out DIR for the run directory (or --resume DIR)")
        cfg = _config(args)
        if env_world().main:  # under torchrun rank 0 may have begun writing it already
            _check_fresh_out(args.out)
        trainer = Trainer(cfg, args.out, stop_after=args.stop_after, checkpoint_every_s=args.checkpoint_every,
                          tensorboard=args.tensorboard)
    try:
        trainer.run()
    finally:
        close(trainer.world)
    return 0


def cmd_train(args) -> int:
    from .genotype import Genotype
    from .distributed import close, env_world
    from .trainer import Trainer
    _check_checkpoint_every(args)
    genotype = Genotype.load(args.genotype)
    cfg = _config(args).override(TRAIN_ONLY)
    if args.epochs is not None:
        cfg = cfg.override([f"optimize_epochs={args.epochs}"])
    if env_world().main:
        _check_fresh_out(args.out)
    trainer = Trainer(cfg, args.out, genotype=genotype, stop_after=args.stop_after,
                      checkpoint_every_s=args.checkpoint_every, tensorboard=args.tensorboard)
    try:
        trainer.run()
    finally:
        close(trainer.world)
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, split=args.split, device=args.device or "auto",
                                 data_dir=args.data_dir)
    print(json.dumps(result, indent=2))
    return 0


def cmd_data(args) -> int:
    from .data import describe, load_dataset
    if args.batch_size is not None and args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.image_size < 4:
        raise ConfigError(f"--image-size must be at least 4, got {args.image_size}")
    images = dict(image_size=args.image_size, cache_dir=args.cache_dir, skip_bad_images=args.skip_bad_images)
    dataset = load_dataset(args.dataset, args.data_dir, images=images)
    print(describe(dataset, args.val_fraction, args.seed, args.batch_size))
    return 0


def cmd_profile(args) -> int:
    from .profile import profile_phases
    cfg = _config(args)
    profile_phases(cfg, args.out, steps=args.steps, top=args.top)
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    print(write_report(args.run, args.out))
    return 0


def cmd_export(args) -> int:
    from .errors import TrainingError
    from .export import export_run
    result = export_run(args.run, args.format, args.out)
    print(json.dumps(result, indent=2))
    if result["max_abs_diff"] > 1e-4 or not result["test_acc_matches"]:
        raise TrainingError(f"{result['file']}: the exported model does not reproduce the run (max |diff| "
                            f"{result['max_abs_diff']:.2e}, test accuracy {result['test_acc']} vs the run's "
                            f"{result['run_test_acc']}); report it as a bug")
    return 0


def cmd_latency(args) -> int:
    import numpy as np

    import torch

    from .build import load_data, optimize_spec, resolve_device
    from .checkpoint import write_json
    from .latency import check_genotypes, latency_table, to_json
    if args.batch <= 0:
        raise ConfigError(f"--batch must be positive, got {args.batch}")
    if args.check < 0:
        raise ConfigError(f"--check must be 0 (no check) or a number of networks, got {args.check}")
    if args.rounds <= 0 or args.probes <= 0:
        raise ConfigError(f"--rounds and --probes must be positive, got {args.rounds} and {args.probes}")
    if args.threads is not None:
        if args.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    device = resolve_device(cfg.device)
    dataset = load_data(cfg, device)
    spec, hw = optimize_spec(cfg, dataset), dataset.image_shape[1:]
    out = args.out or f"latency-{args.preset}-{device.type}-b{args.batch}.json"
    print(f"timing every op at every cell's input shape: batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} CPU thread(s)", file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        print(f"  round {done}/{total}", file=sys.stderr, flush=True)

    networks = check_genotypes(np.random.default_rng([cfg.seed, 202]), args.check, spec.nodes) if args.check else None
    table = latency_table(spec, hw, args.batch, device, channels_last=cfg.channels_last, probes=args.probes,
                          rounds=args.rounds, check_with=networks, progress=progress)
    data = to_json(table)
    print(f"fixed part {table.fixed['latency']:.3f} ms (probe residuals {table.meta['probe_residuals_ms']})")
    if args.check:
        for r in data["check"]["networks"]:
            print(f"  {r['name']:>13}  predicted {r['predicted_ms']:9.3f} ms  measured {r['measured_ms']:9.3f} ms  "
                  f"{100 * r['rel_error']:+6.1f}%")
        for group, found in data["check"]["groups"].items():
            print(f"check, {group}: Spearman {found['spearman']:.3f}, median |error| "
                  f"{100 * found['median_abs_rel_error']:.1f}%, largest {100 * found['max_abs_rel_error']:.1f}%")
    write_json(out, data)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aso-se", description="ASO-SE: differentiable architecture search in four "
                                     "phases (warmup, search, growth, optimize), compiled and profiled.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("search", help="run the four phases; writes a run directory",
                       description="Run warmup, search, growth and optimize; write config.json, metrics.jsonl, "
                                   "genotype.json, checkpoints/ and final.json into --out.", epilog=EPILOG_FIELDS)
    _add_common(p)
    p.add_argument("--out", help="run directory (must not hold a run already)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from checkpoints/last.pt")
    p.add_argument("--from", dest="from_", metavar="NAME", default=None,
                   help="with --resume: continue from this checkpoint instead (e.g. search.pt, when last.pt is "
                        "damaged)")
    _add_checkpoint_every(p)
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs in this process (continue later with --resume)")
    p.add_argument("--list-fields", action="store_true", help="print every config field with its default and exit")
    _add_tensorboard(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("train", help="train a derived architecture from scratch",
                       description="Train the network of a genotype (a genotype.json or final.json) from scratch: "
                                   "the optimize phase alone.", epilog=EPILOG_FIELDS)
    _add_common(p)
    p.add_argument("--genotype", required=True, help="genotype JSON file")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--epochs", type=float, default=None, help="optimize epochs (default: the preset's)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N", help=argparse.SUPPRESS)
    _add_checkpoint_every(p)
    _add_tensorboard(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test (or val) split",
                       description="Evaluate the network held by a checkpoint: the derived network if the "
                                   "optimize phase started, else the current genotype inside the supernet.")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/*.pt file")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--device", default=None)
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="describe a data set: splits, shape, classes, mean/std",
                       description="Read a data set and print its split sizes, image shape, classes and "
                                   "per-channel mean/std.")
    p.add_argument("--dataset", required=True, help="fashion-mnist, cifar10, imagefolder, synthetic or a planted task")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=32, help="imagefolder: the side images are resized to")
    p.add_argument("--cache-dir", default=None, help="imagefolder: where the decoded arrays are kept")
    _add_skip_bad(p)
    p.add_argument("--val-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="check a batch size against the data set")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("profile", help="torch.profiler trace per phase and the top ops by self time",
                       description="Run a few steps of each phase under torch.profiler; write a Chrome trace per "
                                   "phase into --out and print the top ops by self time.", epilog=EPILOG_FIELDS)
    _add_common(p, preset_default="smoke")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per phase (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=12, help="ops to list per phase")
    p.add_argument("--out", required=True, help="directory for the traces")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="write RUN/report/index.html: curves, architecture, cells, tables",
                       description="Draw a run directory (finished or not) as one self-contained HTML page with its "
                                   "figures as PNG and SVG beside it; prints the page's path.")
    p.add_argument("run", help="run directory (the --out of a search)")
    p.add_argument("--out", default=None, help="report directory (default RUN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the trained network as TorchScript or ONNX, checked against the run",
                       description="Write the derived, trained network of a finished run in eval mode, "
                                   "normalization and test-time flip folded in (input: float images in [0, 1]), "
                                   "then load it back without ASO-SE and compare it with the engine.")
    p.add_argument("run", help="a finished run directory")
    p.add_argument("--format", default="torchscript", choices=("torchscript", "onnx"))
    p.add_argument("--out", default=None, help="file (default RUN/model.pt or RUN/model.onnx)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("latency", help="time every op on every edge of the derived network: a latency table",
                       description="Time every op at every cell's input shape of the network the preset's optimize "
                                   "phase trains, on --device, and write the lookup table the search's cost term "
                                   "reads (--set cost=latency --set latency_table=FILE). --check N also times N "
                                   "whole networks and compares them with the table's prediction.",
                       epilog=EPILOG_FIELDS)
    _add_common(p)
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--check", type=int, default=0, metavar="N", help="time N random networks against the table")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds over every op and network; each one's figure is its fastest round (default 5)")
    p.add_argument("--probes", type=int, default=3, help="random networks the fixed part is calibrated on")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads to time with (default: torch's, usually one per core); the file records it")
    p.add_argument("--out", default=None, help="JSON file (default latency-PRESET-DEVICE-bBATCH.json)")
    p.set_defaults(func=cmd_latency)
    return parser


def _add_skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-images", action="store_true",
                   help="imagefolder: skip (and count) image files that do not decode instead of stopping")


def _add_tensorboard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to RUN/tensorboard/ (needs the tensorboard package)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Stopped as e:  # SIGTERM / SIGINT: the checkpoint is written, the run continues with --resume
        print(f"aso-se: {e}", file=sys.stderr)
        return e.exit_code
    except AsoseError as e:
        print(f"aso-se: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or getattr(args, "resume", None)
        hint = f"; continue with: aso-se search --resume {out}" if out and args.command == "search" else ""
        print(f"aso-se: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
