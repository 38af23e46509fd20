"""The `cafi` command line. Errors are one line on stderr and a non-zero exit, not a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from cafi.errors import CafiError, ConfigError

EXIT_FAILED, EXIT_USAGE = 1, 2


def _fail(msg: str, code: int = EXIT_FAILED) -> int:
    print(f"cafi: error: {msg}", file=sys.stderr)
    return code


def cmd_score(args: argparse.Namespace) -> int:
    from cafi.config import load_config
    from cafi.smoke import prepare

    files, overrides = prepare(args.config, args.overrides)
    cfg = load_config(files, overrides)
    from cafi import pipeline

    summary = pipeline.run(cfg)
    counts = summary["counts"]
    print(f"committed run {summary['run_id']} (model version {summary['model_version']}): "
          f"{summary['inputs']} inputs, {counts['accepted']} accepted, status {json.dumps(counts['status'])}, "
          f"reject reasons {json.dumps(counts['reject_reason'])}, {summary['images_per_second']} images/s")
    print(f"manifest: {summary['output']['manifest']}")
    print(f"summary:  {summary['output']['run']}/summary.json")
    return 0


def cmd_weights_synth(args: argparse.Namespace) -> int:
    from cafi.synth import synth

    path = synth(args.dir, detector=args.detector, parser=args.parser, seed=args.seed)
    print(f"wrote synthetic checkpoints and {path}")
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from cafi import preflight
    from cafi.config import load_config
    from cafi.weights import fetch

    cfg = load_config(args.config, list(args.overrides) + ["output.uri=unused", "input.uri=unused"])
    for ckpt in preflight.checkpoints(cfg):
        path = fetch(ckpt, cfg.models.cache_dir, cfg.storage)
        print(f"ok  {ckpt.model:9s} {ckpt.sha256}  {ckpt.uri} -> {path}")
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    """Copy the published checkpoints to a bucket or directory; print the config block."""
    from cafi.config import load_config
    from cafi.models.registry import published
    from cafi.storage import filesystem, join
    from cafi.weights import Checkpoint, fetch

    cfg = load_config(args.config, list(args.overrides) + ["output.uri=unused", "input.uri=unused"])
    m = cfg.models
    archs = {"detector": m.detector.arch, "parser": m.parser.arch, "serfiq": "arcface_ir_se50", "dbcnn": "dbcnn"}
    lines = ["models:"]
    for key, arch in archs.items():
        rec = published(arch)
        local = fetch(Checkpoint(key, rec.uri, rec.sha256, rec.state_key), m.cache_dir, cfg.storage)
        dest = join(args.dest, rec.file_name)
        fs, path = filesystem(dest, cfg.storage)
        fs.put_file(local, path)
        lines += [f"  {key}:", "    weights:", f"      uri: {dest}", f"      sha256: {rec.sha256}"]
    print("\n".join(lines))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from cafi.samples import write_samples

    paths = write_samples(args.dir, count=args.count, seed=args.seed)
    print(f"wrote {len(paths)} sample files under {args.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cafi", description="Score face crops: SER-FIQ + masked-face DBCNN (CAFI).")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config; repeat to compose (later files win)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides, applied last")

    sc = sub.add_parser("score", help="run the scoring job (same as jobs/score.py)")
    add_config(sc)
    sc.set_defaults(func=cmd_score)

    w = sub.add_parser("weights", help="synthesise, fetch or verify checkpoints")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    ws = wsub.add_parser("synth", help="write random checkpoints in the published formats + a config")
    ws.add_argument("dir")
    ws.add_argument("--detector", default="retinaface_resnet50",
                    choices=["retinaface_resnet50", "retinaface_mobile0.25"])
    ws.add_argument("--parser", default="bisenet", choices=["bisenet", "parsenet"])
    ws.add_argument("--seed", type=int, default=0)
    ws.set_defaults(func=cmd_weights_synth)
    wv = wsub.add_parser("verify", help="fetch the configured checkpoints into the cache and check sha256")
    add_config(wv)
    wv.set_defaults(func=cmd_weights_verify)
    wf = wsub.add_parser("fetch", help="copy the published checkpoints to DEST and print the config block")
    wf.add_argument("dest")
    add_config(wf)
    wf.set_defaults(func=cmd_weights_fetch)

    sm = sub.add_parser("samples", help="write generated sample crops (incl. broken files) to DIR")
    sm.add_argument("dir")
    sm.add_argument("--count", type=int, default=24)
    sm.add_argument("--seed", type=int, default=0)
    sm.set_defaults(func=cmd_samples)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("CAFI_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(f"config: {exc}", EXIT_USAGE)
    except CafiError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
