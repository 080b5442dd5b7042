"""wsl: weakly-supervised (hashtag) pretraining at scale, one command per stage.

Every stage reads its config the same way (`wsl.config`): the schema's defaults, then each
`--config` YAML file, then `key.sub=value` overrides. `wsl STAGE --help` lists every key with
its type, default and meaning. A problem with the input is one line on stderr, exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

from wsl.errors import WslError

COMMANDS = {  # stage: (module with `Config` and `main(config) -> summary`, what it does)
    "demo-data": ("wsl.data.demo", "generate the embedded demo hashtag dataset and downstream set"),
    "shards": ("wsl.data.shards", "write images + hashtags into WebDataset tar shards"),
    "dedup": ("wsl.dedup.run", "drop pretraining samples that copy evaluation images, and byte duplicates"),
    "vocab": ("wsl.data.vocab", "count the shards' hashtags and write the hashtag vocabulary"),
    "check-data": ("wsl.data.check", "run the training data pipeline for a few batches: a dry run before a job"),
    "pretrain": ("wsl.train.pretrain", "hashtag pretraining (Lightning; one CPU to many GPU nodes)"),
    "finetune": ("wsl.train.finetune", "fine-tune a pretrained backbone on ImageNet or any labelled image set"),
    "features": ("wsl.eval.features", "pooled features of a frozen backbone for every image (resumable)"),
    "eval": ("wsl.eval.evaluate", "kNN and linear-probe evaluation of frozen backbones"),
    "export": ("wsl.release.export", "a checkpoint -> a release folder (safetensors + .pth named by hash, metadata)"),
    "compare": ("wsl.train.compare", "the val metrics of finished runs, side by side"),
}
USAGE = "usage: wsl STAGE [--config FILE.yaml ...] [--print-config] [key=value ...]"


def overview() -> str:
    width = max(map(len, COMMANDS))
    stages = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return f"{USAGE}\n\n{__doc__.splitlines()[0]}\n\nstages:\n{stages}\n\n`wsl STAGE --help` lists the stage's keys."


def stage_help(command: str, schema: type) -> str:
    from wsl.config import describe

    return f"{USAGE.replace('STAGE', command)}\n\n{schema.__doc__.strip()}\n\nkeys:\n" + "\n".join(describe(schema))


def parse(args: list[str]) -> tuple[list[str], list[str], bool]:
    """(config files, key=value overrides, print the config instead of running)."""
    files, overrides, print_only = [], [], False
    items = iter(args)
    for arg in items:
        if arg == "--config":
            files.append(next(items, None) or "")
            if not files[-1]:
                raise WslError("--config needs a YAML file")
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--print-config":
            print_only = True
        elif arg.startswith("-"):
            raise WslError(f"unknown option {arg}: settings are key=value (`--help` lists the keys)")
        else:
            overrides.append(arg)
    return files, overrides, print_only


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0
    command, args = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked: not the user's concern
    try:
        if command not in COMMANDS:
            raise WslError(f"unknown stage '{command}': one of {', '.join(COMMANDS)}")
        stage = importlib.import_module(COMMANDS[command][0])
        if "-h" in args or "--help" in args:
            print(stage_help(command, stage.Config))
            return 0
        from wsl.config import load, to_yaml

        files, overrides, print_only = parse(args)
        config = load(stage.Config, files, overrides)
        if print_only:
            print(to_yaml(config), end="")
            return 0
        summary = stage.main(config)
        if summary:
            print(summary)
    except WslError as exn:
        print(f"wsl {command}: error: {exn}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wsl {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
