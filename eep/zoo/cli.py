"""``eep-zoo``: list, score, describe and retrain the shipped models."""
from __future__ import annotations

import argparse
import logging
import sys

import eep.zoo
from eep.cli.common import call

USAGE_ERRORS = (ValueError, FileNotFoundError)


def cmd_list(_args) -> None:
    for name in eep.zoo.names():
        print(f"{name}\t{eep.zoo.path(name)}")


def cmd_eval(args) -> None:
    """Score a model config on skills tasks through lm-eval and print one row per task."""
    from eep.evaluate.reference import manager_for, simple_scores
    from eep.models import load_model, model_config

    cfg = model_config(args.model)
    if args.path:
        cfg.path = args.path
    tasks = args.tasks.split(",")
    manager_for(tasks)  # unknown task names fail before the model loads
    model, tok = load_model(cfg)
    scores = simple_scores(model, tok, tasks, limit=args.limit, batch_size=args.batch_size, device=cfg.device)
    print(f"\nmodel: {cfg.location()}\ntest split, {'all' if args.limit is None else args.limit} docs per task\n")
    print(f"{'task':<20} {'metric':<12} score")
    for task, res in scores.items():
        for metric, value in res.items():
            print(f"{task:<20} {metric:<12} {value:.3f}")


def cmd_card(args) -> None:
    from eep.zoo.card import write_card

    print(f"wrote {write_card(args.name) / 'README.md'}")


def cmd_train(args) -> None:
    from eep.zoo.train import main as train_main

    train_main(args.rest)


def cmd_archs(args) -> None:
    """Check every MoE family of the installed transformers on a tiny model and write the table."""
    from eep.arch.conformance import check_all, write_table

    rows = check_all(methods=not args.no_methods, only=args.only.split(",") if args.only else None)
    for r in rows:
        print(f"{r.family:<22} {r.status:<8} {r.reason or ''}")
    if not args.only:
        write_table(rows, args.out)
        print(f"wrote {args.out}")
    failing = [r.family for r in rows if r.status in ("error", "inexact")]
    if failing:
        raise ValueError(f"families failing conformance: {', '.join(failing)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eep-zoo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the shipped models and their folders").set_defaults(func=cmd_list)
    ev = sub.add_parser("eval", help="score a model on skills tasks through lm-eval")
    ev.add_argument("model", nargs="?", default="skills_mixtral", help="a conf/model entry (default skills_mixtral)")
    ev.add_argument("--path", help="score this model folder or hub id instead of the config's model")
    ev.add_argument("--tasks", default="skills_all", help="comma-separated lm-eval task names (default skills_all)")
    ev.add_argument("--limit", type=int, default=None, help="documents per task (default: the whole test split)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.set_defaults(func=cmd_eval)
    card = sub.add_parser("card", help="re-measure a shipped model and rewrite its model card")
    card.add_argument("name", choices=eep.zoo.names())
    card.set_defaults(func=cmd_card)
    ar = sub.add_parser("archs", help="check every MoE family on a tiny model, write docs/architectures.md")
    ar.add_argument("--out", default="docs/architectures.md", help="the table's file (default docs/architectures.md)")
    ar.add_argument("--only", help="comma-separated families to check (prints, writes nothing)")
    ar.add_argument("--no-methods", action="store_true", help="skip the one-shot methods")
    ar.set_defaults(func=cmd_archs)
    tr = sub.add_parser("train", help="train a shipped model (python -m eep.zoo.train --help)")
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return call("eep-zoo", args.func, args, errors=USAGE_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
