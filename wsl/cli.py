"""`wsl`: one subcommand per stage. `wsl <stage> --help` documents every option.

`--config FILE.yaml` sets an option's default (keys are option names with '_' for '-');
options on the command line override it, as in timm's train.py. Problems with the input
are reported in one line (`wsl <stage>: error: ...`) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from wsl.errors import WslError


def _config_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Apply `--config` values as defaults, rejecting keys that are no option of `parser`."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    path = Path(known.config)
    if not path.is_file():
        raise WslError(f"config file not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise WslError(f"{path}: a config must be a mapping of option: value")
    options = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - options)
    if unknown:
        raise WslError(f"{path}: unknown option(s) {', '.join(unknown)}; see `{parser.prog} --help`")
    parser.set_defaults(**values)


def _demo_data(args: argparse.Namespace) -> None:
    from wsl.demo_data import generate

    summary = generate(args.out, args.num_images, args.downstream_train_per_class, args.downstream_val_per_class,
                       args.seed, args.workers)
    state = "already there (same parameters), reused" if summary.get("reused") else "written"
    print(f"demo data {state}: {args.out}")
    print(f"  pretraining annotations: {summary['annotations']}  ({summary['pretrain_images']} images"
          f" + {summary['broken_entries']} broken entries)")
    print(f"  downstream set (ImageNet folder layout): {summary['downstream']}")
    print(f"  synonym file: {summary['synonyms']}")


def _shards(args: argparse.Namespace) -> None:
    from wsl.shards import read_input_shards, read_jsonl, write_shards

    if bool(args.jsonl) == bool(args.input_shards):
        raise WslError("give exactly one input: --jsonl FILE or --input-shards SPEC")
    problems: list[tuple[str, str]] = []
    if args.jsonl:
        samples, problems = read_jsonl(Path(args.jsonl), Path(args.images_root) if args.images_root else None)
    else:
        samples = read_input_shards(args.input_shards)
    stats = write_shards(samples, Path(args.out), prefix=args.prefix, shard_size=args.shard_size,
                         workers=args.workers, input_problems=problems)
    print(f"wrote {stats['samples']} samples in {len(stats['shards'])} shards to {args.out} "
          f"({args.prefix}-NNNNNN.tar; sizes.json, stats.json)")
    skipped = sum(stats["skipped"].values())
    print(f"skipped {skipped} input(s): " + (json.dumps(stats["skipped"]) if skipped else "none"))
    for item in stats["skipped_files"][:10]:
        print(f"  skipped {item['source']}: {item['reason']}")


def _dedup(args: argparse.Namespace) -> None:
    from wsl.dedup import DedupConfig, run_dedup

    config = DedupConfig(threshold=args.threshold, prefilter=args.prefilter, candidates=args.candidates,
                         index=args.index, nprobe=args.nprobe)
    report = run_dedup(args.shards, args.against, args.out, config, workers=args.workers)
    removed = report["removed"]
    print(f"kept {report['kept']} of {report['input_samples']} samples in {len(report['shards'])} shards in {args.out}; "
          f"removed {removed['copies']} copies of the {report['evaluation_images']} evaluation images, "
          f"{removed['exact_duplicates']} byte duplicates, {removed['corrupt']} undecodable images")
    print(f"report: {Path(args.out) / 'dedup_report.json'}; example matches: {report['picture']}")


def _vocab(args: argparse.Namespace) -> None:
    from wsl.vocab import build_vocab_from_shards

    vocab = build_vocab_from_shards(args.shards, synonyms_file=args.synonyms, top_k=args.top_k,
                                    min_count=args.min_count, imagenet=args.imagenet, workers=args.workers)
    path = vocab.save(args.out)
    print(f"vocabulary {vocab.short_hash}: {len(vocab)} classes -> {path}")
    print("  most frequent: " + ", ".join(f"#{c.tag} ({c.count})" for c in vocab.classes[:8]))


def _check_data(args: argparse.Namespace) -> None:
    import time

    from wsl.data import TrainDataConfig, TrainLoader
    from wsl.vocab import Vocabulary

    vocab = Vocabulary.load(args.vocab)
    config = TrainDataConfig(shards=args.shards, vocab=args.vocab, batch_size=args.batch_size,
                             num_workers=args.workers, image_size=args.image_size,
                             resample_exponent=args.resample_exponent)
    loader = TrainLoader(config, vocab)
    started, images = time.time(), 0
    for batch_index, batch in enumerate(loader):
        images += len(batch["key"])
        if batch_index + 1 == args.batches:
            break
    seconds = time.time() - started
    print(f"vocabulary {vocab.short_hash} ({len(vocab)} classes) matches {args.shards}; "
          f"{len(loader)} batches an epoch of {args.batch_size}")
    print(f"read {images} images in {seconds:.1f} s ({images / seconds:.0f} images/s with {args.workers} workers)")
    print(f"skipped or dropped: {json.dumps(loader.skip_counts) if loader.skip_counts else 'none'}")


def _report_run(result: dict, summary: str | None) -> None:
    """What a finished run prints, once (every DDP process runs the command; rank 0 reports)."""
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    if summary:
        print(summary)
    print(f"optimizer steps: {result['global_step']}; checkpoint: {result['checkpoint']}")
    if result["wandb_dir"]:
        print(f"W&B offline run: {result['wandb_dir']}  (upload with `wandb sync {result['wandb_dir']}`)")


def _pretrain(args: argparse.Namespace) -> None:
    from wsl.run import load_config, run_pretraining

    result = run_pretraining(load_config(args.config, args.overrides))
    metrics = result["metrics"]
    _report_run(result, f"held-out hashtag precision@1: {metrics['val/precision@1']:.3f}  (always predicting the most "
                        f"frequent hashtag: {metrics['val/precision@1_most_frequent']:.3f})"
                if "val/precision@1" in metrics else None)


def _accuracy(metrics: dict) -> str:
    return f"val top-1 {100 * metrics['val/top1']:.2f}  top-5 {100 * metrics['val/top5']:.2f}  ({metrics['val/images']:.0f} images"


def _finetune(args: argparse.Namespace) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    from wsl.finetune import DEFAULTS, run_finetuning, run_validation
    from wsl.run import load_config

    config = load_config(args.config, args.overrides, DEFAULTS)
    if args.validate:
        metrics = run_validation(config)["metrics"]
        if rank_zero_only.rank == 0:
            print(f"{_accuracy(metrics)} of {config['data']['val']})")
        return
    result = run_finetuning(config)
    metrics = result["metrics"]
    _report_run(result, f"{_accuracy(metrics)}; start: {config['weights'] or 'random initialisation'})"
                if "val/top1" in metrics else None)


def _features(args: argparse.Namespace) -> None:
    from wsl.data import distributed_rank
    from wsl.features import extract_features, load_features

    out = extract_features(args.source, args.out, args.model, args.weights, labels_file=args.val_labels,
                           image_size=args.image_size, resize=args.resize, batch_size=args.batch_size,
                           num_workers=args.workers, dtype=args.dtype, unit_size=args.unit_size)
    if distributed_rank()[0] == 0:
        try:
            features = load_features(out)
            print(f"{len(features.labels)} features of {features.features.shape[1]} dims ({features.meta['backbone']}) in {out}")
        except WslError as exn:  # other ranks are still writing their parts
            print(f"this rank's parts are written; {exn}")


def _eval(args: argparse.Namespace) -> None:
    from wsl.evaluate import DEFAULTS, run_eval
    from wsl.run import load_config

    report = run_eval(load_config(args.config, args.overrides, DEFAULTS))
    print(report["table"])
    print(f"report: {report['report_file']}; neighbour pictures: {', '.join(report['pictures']) or 'none (shards)'}")
    if report["wandb_dir"]:
        print(f"W&B offline run: {report['wandb_dir']}  (upload with `wandb sync {report['wandb_dir']}`)")


def _export(args: argparse.Namespace) -> None:
    from wsl.release import export

    out = export(args.checkpoint, args.out, name=args.name, vocab=args.vocab, eval_report=args.eval_report)
    metadata = json.loads((out / "metadata.json").read_text())
    print(f"release {metadata['name']} ({metadata['architecture']}, {metadata['head']['kind']} head, "
          f"{metadata['head']['num_classes']} classes) in {out}:")
    for entry in metadata["files"].values():
        print(f"  {entry['file']}  sha256 {entry['sha256']}")
    print(f"  metadata.json, README.md{', vocab.json' if metadata['head'].get('vocab_file') else ''}")
    print(f"load it with: wsl.load_backbone(\"{out}\")")


def _compare(args: argparse.Namespace) -> None:
    results = {}
    for run_dir in args.runs:
        path = Path(run_dir) / "result.json"
        if not path.is_file():
            raise WslError(f"no result.json in {run_dir}: has the run finished?")
        results[run_dir] = json.loads(path.read_text())["metrics"]
    names = sorted({k for metrics in results.values() for k in metrics if k.startswith("val/")})
    width = max(len(r) for r in results)
    print(f"{'run':<{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for run_dir, metrics in results.items():
        cells = [f"{metrics[n]:>12.4f}" if n in metrics else f"{'-':>12}" for n in names]
        print(f"{run_dir:<{width}}  " + "  ".join(cells))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `wsl` parser; `command` is the stage asked for, so only its help pays for heavy imports."""
    parser = argparse.ArgumentParser(prog="wsl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    cpus = os.cpu_count() or 1

    p = sub.add_parser("demo-data", help="generate the embedded demo hashtag dataset and downstream set")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--out", default="data/demo", help="output folder (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=20000, help="pretraining images (default: %(default)s)")
    p.add_argument("--downstream-train-per-class", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--downstream-val-per-class", type=int, default=30, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=cpus, help="processes (default: all CPUs, %(default)s)")
    p.set_defaults(run=_demo_data)

    p = sub.add_parser("shards", help="write images + hashtags into WebDataset tar shards")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--jsonl", help='annotations, one {"path", "hashtags"} or {"path", "caption"} a line')
    p.add_argument("--images-root", help="folder the JSONL paths are relative to (default: the JSONL's folder)")
    p.add_argument("--input-shards", help="img2dataset-style shards (key.jpg + key.json/key.txt): paths, dirs, {a..b}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shard names are PREFIX-NNNNNN.tar (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples a shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=cpus, help="shards written at once (default: %(default)s)")
    p.set_defaults(run=_shards)

    dedup_defaults = None
    if command == "dedup":
        from wsl.dedup import DedupConfig

        dedup_defaults = DedupConfig()
    p = sub.add_parser("dedup", help="drop pretraining samples that copy evaluation images, and byte duplicates",
                       description="Filter pretraining shards: a sample whose image is a resized / re-compressed / "
                                   "cropped / recoloured / mirrored copy of an evaluation image is dropped, as are byte "
                                   "duplicates (the first stays) and undecodable images. Writes the filtered shards "
                                   "(same names), sizes.json, dedup_report.json and dedup_matches.png; a killed run "
                                   "re-run finishes the job.")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--shards", required=True, help="pretraining shards: paths, a folder, {a..b} patterns, joined by ::")
    p.add_argument("--against", required=True, action="append",
                   help="an evaluation set: an image folder (searched recursively) or shards; repeat for several")
    p.add_argument("--out", required=True, help="folder for the filtered shards and the report")
    p.add_argument("--threshold", type=float, default=getattr(dedup_defaults, "threshold", None),
                   help="verified correlation at or above which a sample is a copy (default: %(default)s, chosen on "
                        "planted copies: BENCHMARKS.md)")
    p.add_argument("--prefilter", type=float, default=getattr(dedup_defaults, "prefilter", None),
                   help="retrieval similarity below which a sample is not verified (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=getattr(dedup_defaults, "candidates", None),
                   help="evaluation images verified per sample (default: %(default)s)")
    p.add_argument("--index", choices=["auto", "flat", "ivf"], default=getattr(dedup_defaults, "index", None),
                   help="evaluation window index: exact, or compressed PCA + IVF for large evaluation sets "
                        "(auto: IVF above 2M windows, ~4,000 images) (default: %(default)s)")
    p.add_argument("--nprobe", type=int, default=getattr(dedup_defaults, "nprobe", None),
                   help="IVF lists searched per query (default: %(default)s)")
    p.add_argument("--workers", type=int, default=cpus, help="shards processed at once (default: %(default)s)")
    p.set_defaults(run=_dedup)

    p = sub.add_parser("vocab", help="count the shards' hashtags and write the hashtag vocabulary")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--shards", required=True, help="shards: paths, a directory, {a..b} patterns, URLs; '::' joins")
    p.add_argument("--out", required=True, help="vocabulary JSON to write")
    p.add_argument("--synonyms", help="synonym file: `canonical: synonym, synonym` a line")
    p.add_argument("--top-k", type=int, help="keep the k most frequent classes")
    p.add_argument("--min-count", type=int, default=1, help="keep classes with at least this many images")
    p.add_argument("--imagenet", action="store_true", help="only the 1,000 ImageNet class names as hashtags (+synonyms)")
    p.add_argument("--workers", type=int, default=cpus, help="shards read at once (default: %(default)s)")
    p.set_defaults(run=_vocab)

    p = sub.add_parser("check-data", help="run the training data pipeline for a few batches: a dry run before a job")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--shards", required=True, help="training shards: paths, a directory, {a..b} patterns, URLs")
    p.add_argument("--vocab", required=True, help="vocabulary JSON from `wsl vocab`")
    p.add_argument("--batches", type=int, default=10, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="(default: %(default)s)")
    p.add_argument("--resample-exponent", type=float, default=0.5, help="0 natural, 0.5 sqrt, 1 uniform (default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(cpus, 8), help="DataLoader workers (default: %(default)s)")
    p.set_defaults(run=_check_data)

    description = "Pretrain on hashtag shards. Re-running in the same run_dir resumes from its newest checkpoint."
    if command == "pretrain":  # listing the keys imports Lightning: only when pretraining is asked for
        from wsl.run import describe_config

        description += "\n\nconfig keys (defaults; a config file, then KEY=VALUE, override them):\n" + describe_config()
    p = sub.add_parser("pretrain", help="hashtag pretraining (Lightning; one CPU to many GPU nodes)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=description)
    p.add_argument("--config", help="pretraining YAML (configs/pretrain/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. max_steps=200 data.batch_size=64")
    p.set_defaults(run=_pretrain)

    description = ("Fine-tune a backbone on a labelled image set (ImageNet class folders, Kaggle's flat val/ + "
                   "LOC_val_solution.csv, or key.jpg + key.cls shards). Re-running in the same run_dir resumes.\n"
                   "--validate: only print val top-1/top-5 of `weights` with its own classifier, e.g.\n"
                   "  wsl finetune --validate --config configs/finetune/imagenet_resnext101_32x8d.yaml "
                   "weights=ig_resnext101_32x8-c38310e5.pth")
    if command == "finetune":
        from wsl.finetune import DEFAULTS
        from wsl.run import describe_config

        description += "\n\nconfig keys (defaults; a config file, then KEY=VALUE, override them):\n" + describe_config(DEFAULTS)
    p = sub.add_parser("finetune", help="fine-tune a pretrained backbone on ImageNet or any labelled image set",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=description)
    p.add_argument("--config", help="fine-tuning YAML (configs/finetune/*.yaml)")
    p.add_argument("--validate", action="store_true", help="only validate `weights` (head kept) on data.val")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. epochs=10 weights=path.pth")
    p.set_defaults(run=_finetune)

    p = sub.add_parser("features", help="pooled features of a frozen backbone for every image of a dataset (resumable)",
                       description="Pooled features of a frozen backbone, written in parts under --out. On many GPUs "
                                   "run one process per GPU (torchrun): each writes its share, every image once. "
                                   "Re-running finishes an interrupted extraction.")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--source", required=True, help="image folder (class folders, or flat + labels file) or shards")
    p.add_argument("--out", required=True, help="features folder (meta.json + part-NNNNNN.npz)")
    p.add_argument("--model", required=True, help="architecture, e.g. resnext101_32x8d")
    p.add_argument("--weights", help="checkpoint (.ckpt, .pth, .safetensors); omitted: a random initialisation")
    p.add_argument("--val-labels", help="labels file of a flat folder (default: LOC_val_solution.csv, found)")
    p.add_argument("--image-size", type=int, default=224, help="(default: %(default)s)")
    p.add_argument("--resize", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=min(cpus, 8), help="DataLoader workers (default: %(default)s)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="(default: %(default)s)")
    p.add_argument("--unit-size", type=int, default=1024, help="images a part, for folders (default: %(default)s)")
    p.set_defaults(run=_features)

    description = "kNN (FAISS) and linear-probe accuracy of frozen backbones on a labelled train/val pair."
    if command == "eval":
        from wsl.evaluate import DEFAULTS as EVAL_DEFAULTS
        from wsl.run import describe_config

        description += "\n\nconfig keys (defaults; a config file, then KEY=VALUE, override them):\n" + describe_config(EVAL_DEFAULTS)
    p = sub.add_parser("eval", help="kNN and linear-probe evaluation of frozen backbones",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=description)
    p.add_argument("--config", help="evaluation YAML (configs/eval/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. knn.index=ivf linear.epochs=50")
    p.set_defaults(run=_eval)

    p = sub.add_parser("export", help="a checkpoint -> a release folder (safetensors + .pth named by hash, metadata, card)",
                       description="Export a pretraining or fine-tuning checkpoint as a release folder: the network in "
                                   "torchvision's layout as NAME-<sha256[:8]>.safetensors and .pth, metadata.json, "
                                   "README.md (the model card) and, for a hashtag head, vocab.json. The checkpoint is "
                                   "read without unpickling code.")
    p.add_argument("--config", help="YAML file of option defaults")
    p.add_argument("--checkpoint", required=True, help="a .ckpt of wsl pretrain / wsl finetune, or a .pth / .safetensors")
    p.add_argument("--out", required=True, help="release folder to write")
    p.add_argument("--name", help="file name stem (default: wsl_<architecture>)")
    p.add_argument("--vocab", help="the vocabulary JSON of a hashtag head (checked against the checkpoint's hash)")
    p.add_argument("--eval-report", help="a `wsl eval` report.json whose numbers go into the metadata and the card")
    p.set_defaults(run=_export)

    p = sub.add_parser("compare", help="the val metrics of finished runs, side by side")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding result.json")
    p.set_defaults(run=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    try:
        subparser = parser._subparsers._group_actions[0].choices.get(command) if command else None
        if subparser is not None and command not in ("pretrain", "finetune", "eval"):  # their configs are nested YAML
            _config_defaults(subparser, argv)
        args = parser.parse_args(argv)
        args.run(args)
    except WslError as exn:
        print(f"wsl {command}: error: {exn}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsl {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
