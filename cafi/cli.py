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
    from cafi.redact import redact_text

    print(f"cafi: error: {redact_text(msg)}", file=sys.stderr)  # no URI's userinfo or query
    return code


def cmd_score(args: argparse.Namespace) -> int:
    from cafi.config import load_config
    from cafi.smoke import prepare

    files, overrides = prepare(args.config, args.overrides)
    cfg = load_config(files, overrides)
    from cafi import pipeline

    summary = pipeline.run(cfg)
    counts = summary["counts"]
    if summary.get("noop"):
        print(f"nothing to do: run {summary['run_id']} already committed all {summary['inputs']} inputs "
              f"for model version {summary['model_version']}")
    else:
        print(f"committed run {summary['run_id']} (model version {summary['model_version']}): "
              f"{summary['inputs']} inputs, {counts['accepted']} accepted, status {json.dumps(counts['status'])}, "
              f"reject reasons {json.dumps(counts['reject_reason'])}, {summary['images_per_second']} images/s")
        if summary.get("reuse"):
            print(f"reused from {summary['reuse']['source_version']}: {', '.join(summary['reuse']['reused_stages'])}; "
                  f"stages run: {', '.join(summary['stages_run']) or 'none'}")
    from cafi.manifest import manifest_uri, run_uri
    from cafi.redact import redact_uri
    from cafi.storage import filesystem, join

    run = run_uri(cfg.output.uri, summary["run_id"])  # the summary shows URIs redacted: not for reading
    print(f"manifest: {redact_uri(manifest_uri(cfg.output.uri))}")
    print(f"summary:  {redact_uri(run)}/summary.json")
    report_uri = join(run, "report.html")
    fs, path = filesystem(report_uri, cfg.storage)
    if fs.exists(path):  # written at the end of every run, unless that failed (then a warning says why)
        print(f"report:   {redact_uri(report_uri)}")
    return 0


def cmd_weights_synth(args: argparse.Namespace) -> int:
    from cafi.synth import synth

    path = synth(args.dir, detector=args.detector, parser=args.parser, seed=args.seed)
    print(f"wrote synthetic checkpoints and {path}")
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from cafi.config import load_config
    from cafi.redact import redact_uri
    from cafi.stages import specs
    from cafi.weights import fetch

    cfg = load_config(args.config, list(args.overrides) + ["output.uri=unused", "input.uri=unused"])
    specs.validate(cfg)
    for ckpt in specs.checkpoints(cfg):
        path = fetch(ckpt, cfg.models.cache_dir, cfg.storage)
        print(f"ok  {ckpt.model:9s} {ckpt.sha256}  {redact_uri(ckpt.uri)} -> {path}")
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    """Copy the published checkpoints of the configured stages to a bucket or directory; print the config block."""
    from cafi.config import load_config
    from cafi.models.registry import published
    from cafi.stages import specs
    from cafi.storage import filesystem, join
    from cafi.weights import Checkpoint, fetch, fetch_unpinned

    cfg = load_config(args.config, list(args.overrides) + ["output.uri=unused", "input.uri=unused"])
    specs.validate(cfg, pinned=False)  # a record without a published digest is what this command pins
    m = cfg.models
    archs = {s.section: s.arch(cfg) for s in specs.specs_for(cfg) if s.arch is not None and s.arch(cfg)}
    lines = ["models:"]
    for key, arch in archs.items():
        rec = published(arch)
        # What the weights may be used for travels with them: printed with the config block.
        lines.append(f"  # {arch}: licence {rec.licence or 'unknown'} ({rec.source}); trained on "
                     f"{rec.training_data or 'unknown'}")
        if rec.user_trained:  # nothing published: the team's own training wrote it and its config block
            lines += [f"  # {key}: no published file; `cafi train {key}` writes it and DIR/{key}.yaml, its block"]
            continue
        if rec.manual_download:  # the URI is a web page listing the file: nothing to copy automatically
            lines += [f"  # {key}: download {rec.file_name} by hand from {rec.uri}, copy it to DEST, then:",
                      f"  {key}:", "    weights:", f"      uri: {join(args.dest, rec.file_name)}",
                      "      sha256: <sha256sum of your copy>"]
            continue
        if rec.sha256:
            local = fetch(Checkpoint(key, rec.uri, rec.sha256, rec.state_key), m.cache_dir, cfg.storage)
            sha, note = rec.sha256, ""
        else:  # no published digest: pin the one of the file fetched now (and its name's prefix, if any)
            local, sha = fetch_unpinned(key, rec.uri, rec.file_name, m.cache_dir, cfg.storage, rec.sha256_prefix)
            note = f"  # computed from the copy fetched now: {rec.file_name} has no published sha256"
        dest = join(args.dest, rec.file_name)
        fs, path = filesystem(dest, cfg.storage)
        fs.makedirs(fs._parent(path), exist_ok=True)  # a new local directory; a no-op on object stores
        fs.put_file(local, path)
        lines += [f"  {key}:", "    weights:", f"      uri: {dest}", f"      sha256: {sha}{note}"]
    print("\n".join(lines))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from cafi.samples import write_samples

    paths = write_samples(args.dir, count=args.count, seed=args.seed)
    print(f"wrote {len(paths)} sample files under {args.dir}")
    return 0


def _storage(args: argparse.Namespace):
    """Storage settings from --endpoint-url / --region / --anon; None when none is given."""
    from cafi.config import StorageConfig

    if args.endpoint_url is None and args.region is None and not args.anon:
        return None
    return StorageConfig(endpoint_url=args.endpoint_url, region=args.region, anon=args.anon)


def cmd_report(args: argparse.Namespace) -> int:
    from cafi import report
    from cafi.redact import redact_uri

    dest = report.write_report(args.run, out=args.out, storage=_storage(args))
    print(f"report: {redact_uri(dest)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cafi import edc, evaluate

    if args.labels is None and args.identities is None:
        return _fail("eval: nothing to evaluate against: give LABELS.csv and/or --identities IDS.csv", EXIT_USAGE)
    options = edc.Options(nonmated=args.nonmated, seed=args.seed, fmr=args.fmr, start_fnmr=args.start_fnmr,
                          pauc_limit=args.pauc_limit, min_mated=args.min_mated, target_fnmr=args.target_fnmr)
    result = evaluate.evaluate(args.manifest, args.labels, storage=_storage(args), precision=args.precision,
                               mos_column=args.mos_column, accept_column=args.accept_column,
                               identities_uri=args.identities, identity_column=args.identity_column,
                               options=options, fit_fusion=args.fit_fusion)
    print(result.to_json() if args.json else evaluate.format_result(result))
    if args.out:
        from cafi import eval_page

        written = eval_page.write_outputs(result, args.out, _storage(args))
        print(f"wrote {', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cafi.export import export
    from cafi.redact import redact_uri

    summary = export(args.run, args.to, decision=args.decision, fmt=args.format,
                     samples_per_shard=args.samples_per_shard, storage=_storage(args), curation=args.curation)
    print(f"exported {summary['samples']} {args.decision} samples of run {summary['run_id']} as "
          f"{len(summary['shards'])} {args.format} shard(s), {summary['bytes']} bytes: {redact_uri(args.to)}")
    if summary["skipped"]:  # what could not be read is left out, never an aborted export
        reasons = ", ".join(f"{reason}: {n}" for reason, n in summary["skipped"].items())
        print(f"skipped {sum(summary['skipped'].values())} sample(s) that could not be read ({reasons}); "
              "see export.json")
    if "curation" in summary:
        removed = {k: v for k, v in summary["curation"]["removed"].items() if v}
        print(f"curation kept {summary['curation']['kept']}; removed {json.dumps(removed)}")
    return 0


def cmd_identities(args: argparse.Namespace) -> int:
    from cafi.identities.command import identities
    from cafi.identities.options import Options
    from cafi.redact import redact_uri

    options = Options(min_centroid_cos=args.min_centroid_cos, outlier_mad=args.outlier_mad, weighted=args.weighted,
                      subcentres=args.subcentres, dup_cos=args.dup_cos, conflict_cos=args.conflict_cos,
                      merge_cos=args.merge_cos, max_per_identity=args.max_per_identity,
                      min_per_identity=args.min_per_identity, quality=args.quality, bucket_rows=args.bucket_rows,
                      nprobe=args.nprobe)
    s = identities(args.run, args.out, ids_uri=args.identities, identity_column=args.identity_column,
                   options=options, storage=_storage(args))
    removed = {k: v for k, v in s["removed"].items() if v}
    print(f"curated {s['samples']} samples of {s['identities']} identities (run {s['run_id']}, quality "
          f"{s['quality']}): {s['kept']} kept, removed {json.dumps(removed)}; {s['conflict_pairs']} conflict "
          f"pair(s), {s['merge_candidate_pairs']} merge candidate pair(s), {s['wall_seconds']} s")
    print(f"wrote samples.parquet, identities.parquet, identities.html, summary.json: {redact_uri(args.out)}")
    return 0


def cmd_train_sddfiqa(args: argparse.Namespace) -> int:
    from cafi.redact import redact_uri
    from cafi.storage import join
    from cafi.train import sddfiqa as train_sddfiqa

    common = {"identities": args.identities, "identity_column": args.identity_column, "seed": args.seed,
              "storage": _storage(args)}
    if args.labels_only:
        doc = train_sddfiqa.labels(args.run, args.out, **common)
    else:
        units = tuple(int(u) for u in args.units.split(",")) if args.units else None
        doc = train_sddfiqa.train(args.run, args.out, epochs=args.epochs, batch_size=args.batch_size,
                                  workers=args.workers, use_gpu=args.use_gpu, init=args.init, lr=args.lr,
                                  heldout=args.heldout, width=args.width, units=units, backbone=args.backbone,
                                  **common)
    s = doc["labels"]
    print(f"pseudo-labels of run {doc['run_id']}: {s['labelled']} of {s['rows']} rows labelled "
          f"({s['identities']} identities; {s['unlabelled_one_sample']} rows of one-sample identities unlabelled), "
          f"seed {doc['seed']}, {doc['seconds']} s")
    print(f"labels: {redact_uri(join(args.out, 'labels.parquet'))}")
    if args.labels_only:
        print(f"stats:  {redact_uri(join(args.out, 'labels.json'))}")
        return 0
    last = doc["epochs"][-1] if doc["epochs"] else {}
    print(f"trained {doc['training']['epochs_done']} epoch(s) from {doc['init']['source']} init: train loss "
          f"{last.get('train_loss', float('nan')):.3f}, held-out SRCC {last.get('heldout_srcc', float('nan')):.3f} "
          f"({doc['split']['heldout_rows']} faces of {doc['split']['heldout_identities']} held-out identities)")
    for name in ("sddfiqa.pth", "sddfiqa.yaml", "train.json", "train.html", "heldout.csv"):
        print(f"wrote {redact_uri(join(args.out, name))}")
    return 0


def cmd_train_classic(args: argparse.Namespace) -> int:
    from cafi.classic.fit import FitSettings
    from cafi.redact import redact_uri
    from cafi.storage import join
    from cafi.train import classic as train_classic

    settings = FitSettings(holdout=args.heldout, seed=args.seed, epochs_autoencoder=args.epochs_autoencoder,
                           epochs_classifier=args.epochs_classifier, epochs_finetune=args.epochs_finetune)
    doc = train_classic.train(args.labels, args.run, args.out, uri_column=args.uri_column,
                              label_column=args.label_column, identity_column=args.identity_column,
                              heldout=args.heldout, settings=settings, storage=_storage(args))
    r, held = doc["rows"], doc["heldout"]
    print(f"classic FQA of run {doc['run_id']}: {r['used']} of {r['labelled']} labelled faces "
          f"({', '.join(f'{k} {v}' for k, v in r['per_class'].items())}); {r['not_found']} not in the run "
          f"with landmarks and an embedding; {doc['seconds']} s")
    print(f"held-out accuracy {held['accuracy']:.3f} on {held['rows']} faces (split by {doc['split']['by']}); "
          f"confusion (rows true, columns predicted {'/'.join(doc['classes'])}): {held['confusion']}")
    for name in train_classic.OUTPUTS:
        print(f"wrote {redact_uri(join(args.out, name))}")
    return 0


def _ray_cause(exc: BaseException) -> BaseException | None:
    """The CafiError behind an exception: itself, or the one inside an error Ray raised for a task,
    an actor or a Ray Data operator. None when there is none."""
    import re

    def is_ray(e: BaseException) -> bool:
        return any(c.__module__.startswith("ray.") for c in type(e).__mro__)

    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:  # structured causes first: RayTaskError.cause, __cause__, __context__
        e = todo.pop(0)
        if e is None or any(e is x for x in seen):
            continue
        seen.append(e)
        if isinstance(e, CafiError) and not is_ray(e):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    # An actor that died in __init__, or a failed Ray Data UDF, keeps the cause only as the text of
    # the worker's traceback, whose last line names it: "cafi.errors.XError: message".
    from cafi import errors

    for e in seen:
        if not is_ray(e):
            continue
        found = re.findall(r"cafi\.errors\.(\w+): (.+)", f"{getattr(e, 'error_msg', '') or ''}\n{e}")
        if found:
            name, msg = found[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, CafiError):
                return cls(msg.strip())
    return None


def _flat(exc: BaseException) -> str:
    """A message on one line: its lines joined."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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

    def add_storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
        sp.add_argument("--region", default=None, help="object-store region")
        sp.add_argument("--anon", action="store_true", help="anonymous access to a public bucket")

    rp = sub.add_parser("report", help="write the HTML report of a committed run",
                        description="Write one self-contained HTML report of a run: counts, histograms of its "
                                    "scores and quality components with their thresholds, the FIQA/IQA decision "
                                    "space and yaw against the FIQA score, thumbnails per reject reason, stage "
                                    "throughput.")
    rp.add_argument("run", metavar="RUN_URI",
                    help="<output>/runs/<run_id>, or an output root for its latest committed run")
    rp.add_argument("--out", metavar="FILE", default=None,
                    help="where to write the HTML (default: RUN_URI/report.html)")
    add_storage(rp)
    rp.set_defaults(func=cmd_report)

    ev = sub.add_parser("eval", help="compare quality scores with human labels and with recognition (EDC)",
                        description="Against human labels (LABELS.csv): every quality column's SRCC/PLCC against "
                                    "a MOS and the F1 of its best single threshold against a human accept/reject, "
                                    "the decision's precision/recall/F1 and suggested FIQA/IQA thresholds. Against "
                                    "identities (--identities): the error-versus-discard characteristic (EDC, "
                                    "ISO/IEC 29794-1) of every quality column from the stored embeddings.")
    ev.add_argument("manifest", metavar="RUN_OR_MANIFEST",
                    help="an output root (latest committed model version) or a run URI <output>/runs/<run_id>")
    ev.add_argument("labels", metavar="LABELS.csv", nargs="?", default=None,
                    help="CSV with a uri column and a MOS column and/or an accept column (1/0, true/false, ...)")
    ev.add_argument("--precision", type=float, default=None, metavar="P",
                    help="suggest the thresholds with the best recall among those reaching precision P "
                         "(default: the thresholds that maximise F1)")
    ev.add_argument("--mos-column", default="mos", help="name of the MOS column (default: mos)")
    ev.add_argument("--accept-column", default="accept", help="name of the accept column (default: accept)")
    ev.add_argument("--fit-fusion", action="store_true",
                    help="fit non-negative decision.fusion.weights to the labels (SRCC with the MOS, else F1 with "
                         "the accepts) over the run's quality columns and print the config block")
    ed = ev.add_argument_group("EDC (needs embeddings: score with output.embeddings=true)")
    ed.add_argument("--identities", metavar="IDS.csv", default=None,
                    help="CSV with a uri column and an identity column: compute the EDC of every quality column")
    ed.add_argument("--identity-column", default="identity", help="name of the identity column (default: identity)")
    ed.add_argument("--nonmated", type=int, default=1_000_000, metavar="N",
                    help="non-mated pairs to sample for the FMR threshold (default: 1,000,000; all when fewer)")
    ed.add_argument("--seed", type=int, default=0, help="seed of the non-mated sample (default: 0)")
    start = ed.add_mutually_exclusive_group()
    start.add_argument("--fmr", type=float, default=1e-3,
                       help="fix the threshold at this false-match rate (default: 0.001)")
    start.add_argument("--start-fnmr", type=float, default=None, metavar="F",
                       help="fix the threshold at this starting FNMR instead")
    ed.add_argument("--pauc-limit", type=float, default=0.2, metavar="L",
                    help="pAUC up to this discarded fraction (default: 0.2)")
    ed.add_argument("--min-mated", type=int, default=100, metavar="N",
                    help="fewer mated pairs than this: no curves, a message (default: 100)")
    ed.add_argument("--target-fnmr", type=float, default=None, metavar="F",
                    help="report each score's threshold (in its own units) that brings the FNMR down to F")
    ev.add_argument("--out", metavar="DIR", default=None,
                    help="also write eval.html to DIR (with --identities also edc.json, edc.csv, pauc.csv)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    add_storage(ev)
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a committed run's curated samples as WebDataset or Parquet shards",
                        description="Write the samples of a committed run (by decision) as new shards: each "
                                    "sample's original bytes with its scores, decision and kept columns (.json "
                                    "member, or columns), sorted by uri, then export.json and _SUCCESS.")
    ex.add_argument("run", metavar="RUN_URI", help="<output>/runs/<run_id>, or an output root for its latest run")
    ex.add_argument("--to", required=True, metavar="URI",
                    help="an empty prefix (or an earlier export's) for the shards")
    ex.add_argument("--decision", default="accepted", choices=["accepted", "rejected", "all"],
                    help="which rows to export (default: accepted)")
    ex.add_argument("--format", default="webdataset", choices=["webdataset", "parquet"],
                    help="000000.tar with <key>.<ext> + <key>.json per sample, or 000000.parquet (default: webdataset)")
    ex.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                    help="samples per shard (default: 1000)")
    ex.add_argument("--curation", metavar="URI", default=None,
                    help="a `cafi identities` output of this run: export only the samples it keeps")
    add_storage(ex)
    ex.set_defaults(func=cmd_export)

    idp = sub.add_parser(
        "identities", help="curate identities: outliers, near-duplicates, conflicts, merge candidates, caps",
        description="Over a run's stored embeddings (score with output.embeddings=true) and an identity per sample: "
                    "each sample's cosine to the centroid of the other samples of its identity (outliers), "
                    "near-duplicates within an identity (the best quality kept), samples of different identities "
                    "that are the same photo (an approximate-nearest-neighbour index), identities whose centroids "
                    "are close (merge candidates) and per-identity caps. Every sample gets keep and the first "
                    "reason, in the order no_embedding, outlier, conflict, duplicate, over_cap, small_identity. "
                    "Writes samples.parquet, identities.parquet, identities.html and summary.json under --out; "
                    "`cafi export RUN --curation OUT` exports the kept samples.")
    idp.add_argument("run", metavar="RUN_OR_OUTPUT",
                     help="<output>/runs/<run_id>, or an output root for its latest committed run")
    who = idp.add_mutually_exclusive_group(required=True)
    who.add_argument("--identities", metavar="IDS.csv", default=None,
                     help="CSV with a uri column and an identity column")
    who.add_argument("--identity-column", metavar="COL", default=None,
                     help="the identity is this kept input column of the run (input.keep_columns)")
    idp.add_argument("--out", required=True, metavar="URI", help="an empty prefix (or an earlier curation's)")
    idp.add_argument("--min-centroid-cos", type=float, default=0.225, metavar="C",
                     help="outlier below this cosine to its identity's leave-one-out centroid (default: 0.225, "
                          "the ArcFace rule; -1: off)")
    idp.add_argument("--outlier-mad", type=float, default=None, metavar="K",
                     help="also an outlier below its identity's median by more than K median absolute deviations")
    idp.add_argument("--weighted", action="store_true",
                     help="weight the centroid by the quality's rank within the identity")
    idp.add_argument("--subcentres", type=int, default=1, metavar="K",
                     help="K sub-centres per identity; samples are compared with the dominant one (default: 1)")
    idp.add_argument("--dup-cos", type=float, default=0.95, metavar="C",
                     help="near-duplicates within an identity at cosine >= C (default: 0.95)")
    idp.add_argument("--conflict-cos", type=float, default=0.9, metavar="C",
                     help="samples of different identities at cosine >= C are a conflict (default: 0.9)")
    idp.add_argument("--merge-cos", type=float, default=0.7, metavar="C",
                     help="list identity pairs whose centroids are at cosine >= C (default: 0.7)")
    idp.add_argument("--max-per-identity", type=int, default=None, metavar="K",
                     help="keep the K best (by --quality) of what is left of each identity")
    idp.add_argument("--min-per-identity", type=int, default=None, metavar="M",
                     help="drop identities left with fewer than M samples")
    idp.add_argument("--quality", default=None, metavar="COL",
                     help="quality column for ranks, duplicates and caps (default: the run's FIQA kind)")
    idp.add_argument("--bucket-rows", type=int, default=50_000, metavar="N",
                     help="rows per hash bucket, the memory of one task (default: 50,000)")
    idp.add_argument("--nprobe", type=int, default=3, metavar="N",
                     help="index cells each sample is looked up in, for conflicts (default: 3)")
    add_storage(idp)
    idp.set_defaults(func=cmd_identities)
    tr = sub.add_parser("train", help="learn a quality model from the run's own recognizer")
    tsub = tr.add_subparsers(dest="train_command", required=True)
    ts = tsub.add_parser("sddfiqa", help="SDD-FIQA pseudo-labels from a run's stored embeddings",
                         description="SDD-FIQA pseudo-labels (Ou et al. 2021, as Tencent/TFace computes them) of "
                                     "a committed run's rows, from the recognition embeddings it stored "
                                     "(output.embeddings=true): per sample, the Wasserstein distance between its "
                                     "similarities to 24 samples of its identity and to 24 of other identities, "
                                     "12 draws, normalised to 0..100. Writes DIR/labels.parquet and "
                                     "DIR/labels.json; then (without --labels-only) trains the SDD-FIQA regressor on "
                                     "them with Ray Train (faces re-aligned from the run's landmarks, held-out "
                                     "identities, a checkpoint per epoch: run again with the same --out to "
                                     "resume) and writes DIR/sddfiqa.pth, sddfiqa.yaml, train.json, train.html, "
                                     "heldout.csv.")
    ts.add_argument("run", metavar="RUN_OR_OUTPUT",
                    help="<output>/runs/<run_id>, or an output root for its latest model version's committed runs")
    ts.add_argument("--identities", metavar="IDS.csv", default=None,
                    help="CSV with a uri column and an identity column (default: the kept column "
                         "--identity-column of the run)")
    ts.add_argument("--identity-column", default="identity",
                    help="the identity column: of IDS.csv, or without --identities a column the run kept "
                         "(default: identity)")
    ts.add_argument("--out", required=True, metavar="DIR",
                    help="where to write the labels, checkpoints and trained model")
    ts.add_argument("--labels-only", action="store_true", help="stop after the labels")
    ts.add_argument("--epochs", type=int, default=10, help="epochs in all, resumed ones included (default: 10)")
    ts.add_argument("--batch-size", type=int, default=64, help="faces per step and worker (default: 64)")
    ts.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    ts.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ts.add_argument("--init", metavar="PATH", default=None,
                    help="checkpoint to start from, in the published layout (default: the SDD-FIQA weights the "
                         "run's config names, else random initialisation, said in the log and train.json)")
    ts.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)")
    ts.add_argument("--heldout", type=float, default=0.1, metavar="FRACTION",
                    help="fraction of the identities held out for SRCC (default: 0.1)")
    ts.add_argument("--backbone", default="ir50", choices=("ir50", "maniqa", "maniqa_tiny"),
                    help="the regressor: ir50 (TFace's IR-50, default) or maniqa (MANIQA in its place, as the "
                         "seed team trained it; models.sddfiqa.arch: sddfiqa_maniqa scores with it; "
                         "maniqa_tiny: toy widths, for tests)")
    ts.add_argument("--width", type=int, default=None, help=argparse.SUPPRESS)  # reduced nets: tests, benches
    ts.add_argument("--units", default=None, help=argparse.SUPPRESS)
    ts.add_argument("--seed", type=int, default=0, help="seed of the random draws and of the pool (default: 0)")
    add_storage(ts)
    ts.set_defaults(func=cmd_train_sddfiqa)
    tc = tsub.add_parser("classic", help="the score-based FQA classifier from good/average/bad labels",
                         description="The score-based FQA classifier (GIST, HOG, LBP and the run's recognition "
                                     "embedding, each through an autoencoder to 50 values, a joint autoencoder, "
                                     "a softmax over good/average/bad) trained on LABELS.csv's labels of a "
                                     "committed run's faces, re-aligned from the landmarks it stored; the run "
                                     "needs output.embeddings=true. Plain torch on this process (thousands of "
                                     "rows). Writes DIR/classic.pth, classic.yaml (the models.classic.weights "
                                     "block), train.json (held-out accuracy, confusion matrix), train.html.")
    tc.add_argument("labels", metavar="LABELS.csv", help="CSV with a URI column and a good/average/bad label column")
    tc.add_argument("--run", required=True, metavar="RUN_OR_OUTPUT",
                    help="<output>/runs/<run_id>, or an output root for its latest model version's committed runs")
    tc.add_argument("--out", required=True, metavar="DIR", help="where to write the model (any fsspec URI)")
    tc.add_argument("--uri-column", default="uri", help="LABELS.csv's URI column (default: uri)")
    tc.add_argument("--label-column", default="label", help="LABELS.csv's label column (default: label)")
    tc.add_argument("--identity-column", default=None,
                    help="a LABELS.csv column of identities: the held-out split keeps each on one side")
    tc.add_argument("--heldout", type=float, default=0.2, metavar="FRACTION",
                    help="fraction of each class held out for the accuracy (default: 0.2)")
    tc.add_argument("--seed", type=int, default=0, help="seed of the split and the initialisation (default: 0)")
    tc.add_argument("--epochs-autoencoder", type=int, default=60, help="epochs of each autoencoder (default: 60)")
    tc.add_argument("--epochs-classifier", type=int, default=150, help="epochs of the softmax layer (default: 150)")
    tc.add_argument("--epochs-finetune", type=int, default=60, help="epochs of the fine-tuning (default: 60)")
    add_storage(tc)
    tc.set_defaults(func=cmd_train_classic)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("CAFI_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback (CAFI_DEBUG=1 shows it)
        if os.environ.get("CAFI_DEBUG"):
            import traceback

            traceback.print_exc()
        cause = _ray_cause(exc)  # the exception itself when it is a plain CafiError
        if isinstance(cause, ConfigError):
            return _fail(f"config: {_flat(cause)}", EXIT_USAGE)
        if cause is not None:
            return _fail(_flat(cause) or type(cause).__name__)
        return _fail(_one_line(exc))


if __name__ == "__main__":
    sys.exit(main())
