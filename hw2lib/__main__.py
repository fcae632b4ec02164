"""``python -m hw2lib <command>``: the report pipeline, training, and the course entry points."""
from __future__ import annotations

import argparse
import sys


def _params(items):
    from .pipeline import parse_param

    return dict(parse_param(p) for p in items or [])


def cmd_run(args) -> int:
    from .pipeline import PipelineError, run

    try:
        result = run(args.profile, only=args.only, params=_params(args.param), publish=not args.no_publish,
                     log_output=args.log_output)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = sum(n.seconds for n in result.notebooks)
    print(f"all {len(result.notebooks)} notebook(s) succeeded in {total:.1f} s; executed copies in {result.run_dir}")
    return 0


def cmd_train(args) -> int:
    from .training import train_command

    return train_command(args.part, args.profile, _params(args.param), max_minutes=args.max_minutes,
                         export=not args.no_export, threads=args.threads, evaluate_per_digit=args.evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hw2lib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute the notebooks with papermill and rebuild figures/ and report.md",
                       description="Execute notebooks/*.ipynb in order with papermill into runs/<profile>/NAME.ipynb "
                                   "(plus an HTML export), injecting `profile` and the -p overrides. figures/ and "
                                   "report.md are refreshed only after every requested notebook succeeded.")
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"],
                   help="smoke: seconds (tests); quick: the CPU default; full: GPU + real course data")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only this notebook (e.g. ddpm, 02_ddim); repeatable")
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE",
                   help="a notebook parameter, e.g. -p data_root=/data/hw2_data -p device=cuda; repeatable")
    p.add_argument("--no-publish", action="store_true", help="do not touch figures/ and report.md")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' output")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="train (or resume) a model and export it to weights/",
                       description="Train or resume the model of PART for PROFILE from its newest checkpoint, then "
                                   "export its EMA weights to weights/<part>_<profile>.pt with a JSON manifest "
                                   "(dann: train the six models into checkpoints/). Runs under torchrun.")
    p.add_argument("part", choices=["ddpm", "faces", "dann"],
                   help="ddpm / faces: the diffusion models (exported to weights/); dann: the six DANN models "
                        "(checkpoints/, read by notebooks/03_dann.ipynb and dann-predict)")
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    p.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="config override; repeatable")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-export", action="store_true", help="only train; do not write weights/")
    p.add_argument("--evaluate", type=int, default=20, metavar="N",
                   help="digits per class generated to record accuracies in the manifest (0: skip)")
    p.set_defaults(func=cmd_train)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live beside their part: each module offers ``add_cli(subparsers)``."""
    import importlib

    out = []
    for name in ("hw2lib.report", "hw2lib.ddpm", "hw2lib.ddim", "hw2lib.dann"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        if hasattr(module, "add_cli"):
            out.append(module.add_cli)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
