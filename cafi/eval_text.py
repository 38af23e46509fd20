"""The text `cafi eval` prints without `--json`: the labels section (the ranking, the decision against
the human one, the suggested thresholds) and the EDC section (threshold, pAUC table)."""

from __future__ import annotations

import math

from cafi.eval_fusion import MIN_ROWS, FusionFit
from cafi.eval_identities import EdcSection
from cafi.eval_labels import LabelResult
from cafi.eval_result import Result

# A column's direction (Column.better) in words; None: an order that is not a column (ideal, random).
BETTER = {"higher": "higher", "lower": "lower", "abs_lower": "|x| lower", "near_half": "near 0.5", None: ""}


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _thr(x: float | None) -> str:
    return "none" if x is None else f"{x:g}"


def format_labels(r: LabelResult, source: str) -> list[str]:
    """The labels section; the --fit-fusion result last, so its config block ends the text."""
    return _labels(r, source) + (format_fusion(r.fusion) if r.fit_fusion else [])


def _labels(r: LabelResult, source: str) -> list[str]:
    lines = [f"cafi eval: {r.matched} of {r.labels} labelled URIs found in {source}"]
    if r.unmatched_examples:
        lines.append(f"  {r.labels - r.matched} labelled URIs are not in the manifest, e.g. "
                     + ", ".join(r.unmatched_examples[:3]))
    if r.sorted_by:
        by = "SRCC against the MOS" if r.sorted_by == "srcc" else "F1 against the human decision"
        lines += ["", f"Quality columns against the labels (oriented so higher is better; best first by {by}; "
                      "PLCC without a logistic mapping;", "F1: the best single threshold, rows without a value "
                      "rejected):",
                  f"  {'column':<15}{'better':<11}{'n':>6}{'SRCC':>8}{'PLCC':>8}{'n':>6}{'F1':>7}{'prec':>7}"
                  f"{'recall':>8}  best single threshold"]
        for e in r.ranking:
            lines.append(f"  {e['column']:<15}{BETTER[e['better']]:<11}{e.get('n_mos', ''):>6}"
                         f"{_f(e.get('srcc')) if 'srcc' in e else '':>8}{_f(e.get('plcc')) if 'plcc' in e else '':>8}"
                         f"{e.get('n_accept', ''):>6}{_f(e.get('f1')) if 'f1' in e else '':>7}"
                         f"{_f(e.get('precision')) if 'precision' in e else '':>7}"
                         f"{_f(e.get('recall')) if 'recall' in e else '':>8}  {e.get('rule', '')}")
    if not any("srcc" in e for e in r.ranking):
        lines += ["", "No MOS in the labels: no correlations."]
    if r.decision is None:
        lines += ["", "No human accept/reject in the labels: no decision metrics, no threshold suggestion."]
        return lines
    t, fi, iq = r.thresholds, f"min_{r.fiqa}", f"min_{r.iqa}"
    lines += ["", f"CAFI decision against the human decision ({r.decision_rows} rows, {r.human_accepts} human "
                  f"accepts; accept is the positive class):",
              f"  {'thresholds':<34}{fi:>15}{iq:>15}{'accepted':>9}{'TP':>6}{'FP':>6}{'FN':>6}"
              f"{'precision':>10}{'recall':>8}{'F1':>7}"]

    def row(name: str, ms: float | None, md: float | None, c: dict) -> str:
        return (f"  {name:<34}{_thr(ms):>15}{_thr(md):>15}{c['accepted']:>9}{c['tp']:>6}{c['fp']:>6}{c['fn']:>6}"
                f"{_f(c['precision']):>10}{_f(c['recall']):>8}{_f(c['f1']):>7}")

    lines.append(row("this run (its accepted column)", t.get(fi), t.get(iq), r.decision))
    s = r.suggestion
    if s is None:
        if r.precision_target is not None:
            lines.append(f"  no {r.fiqa}/{r.iqa} threshold pair reaches precision {r.precision_target:g} on these "
                         "labels")
        else:
            lines.append("  no threshold pair accepts any human-accepted crop: nothing to suggest")
        return lines
    lines.append(row(f"suggested ({s.goal})"[:33], s.min_fiqa, s.min_iqa, s.confusion.as_dict()))
    if r.precision_target is not None:
        lines.append(f"  (the best recall among the threshold pairs reaching precision {r.precision_target:g})")
    lines += ["", "Suggested config (every other decision threshold stays as it is):",
              "decision:", f"  {fi}: {s.min_fiqa:g}", f"  {iq}: {'null' if s.min_iqa is None else f'{s.min_iqa:g}'}"]
    return lines


def format_fusion(f: FusionFit | None) -> list[str]:
    if f is None:
        return ["", f"--fit-fusion: fewer than {MIN_ROWS} labelled rows or fewer than two quality columns with a "
                    "range and values: nothing fitted"]
    fitted = (f"SRCC {_f(f.srcc)} against the MOS" if f.target == "mos" else f"F1 {_f(f.f1)} against the accepts")
    single = f.best_single
    best = (f"{single['column']}: SRCC {_f(single['srcc'])}" if "srcc" in single
            else f"{single['column']}: F1 {_f(single.get('f1'))}")
    lines = ["", f"Fused score fitted to the {'MOS' if f.target == 'mos' else 'human accepts'} "
                 f"({f.rows} rows, non-negative weights over {len(f.columns)} columns: {', '.join(f.columns)}):",
             f"  fitted: {fitted}" + (f"; F1 {_f(f.f1)} at min_fused {f.min_fused:.4g}" if f.target == "mos"
                                      and f.f1 is not None else ""),
             f"  best single column on the same rows: {best}", "", "Config (a threshold-only re-score applies it):"]
    return lines + f.config_block().splitlines()


def format_edc(e: EdcSection) -> list[str]:
    r, o = e.result, e.result.options
    lines = [f"EDC (ISO/IEC 29794-1:2024): {e.listed:,} URIs in {e.file}, {e.found:,} in the manifest, "
             f"{e.embedded:,} with an embedding; {r.identities:,} identities, {r.mated:,} mated pairs"
             + (f", {r.nonmated:,} non-mated pairs" + (f" (seeded sample, seed {o.seed})" if r.nonmated_sampled
                                                       else " (all)") if o.start_fnmr is None else "")]
    lines.append(f"  embeddings: {e.recognizer()}")
    if r.message:
        return lines + [f"  {r.message[0].upper()}{r.message[1:]}."]
    if o.start_fnmr is None:
        lines.append(f"  threshold: cosine similarity >= {r.threshold:.4f} (FMR {r.fmr:.2g} on the non-mated pairs, "
                     f"target {o.fmr:g}) -> starting FNMR {r.start_fnmr:.4f}")
        if r.nonmated * o.fmr < 10:
            lines.append(f"  note: {r.nonmated:,} non-mated pairs resolve an FMR of {o.fmr:g} with fewer than 10 "
                         "false matches; raise --nonmated for a steadier threshold")
    else:
        lines.append(f"  threshold: cosine similarity >= {r.threshold:.4f} (starting FNMR {r.start_fnmr:.4f}, "
                     f"target {o.start_fnmr:g})")
    if r.start_fnmr == 0:
        lines.append("  the starting FNMR is 0: there is no error to discard (every curve is flat at 0); "
                     "use --start-fnmr or a smaller --fmr")
    tgt = f"  threshold for FNMR <= {o.target_fnmr:g} (discarded)" if o.target_fnmr is not None else ""
    lines += [f"  pAUC up to {o.pauc_limit:.0%} discarded (lower is better; relative: 0 = ideal order, 1 = random "
              "order; pairs without a quality value go first):",
              f"  {'order':<15}{'better':<11}{'pAUC':>9}{'relative':>10}{'FNMR@' + f'{o.pauc_limit:.0%}':>10}"
              f"{'unrated':>9}{tgt}"]
    for row in e.pauc_rows():
        name = row["score"] if row["order"] == "score" else f"({row['order']})"
        target = ""
        if row["target"] is not None:
            t = row["target"]
            target = ("  not reached" if not t["reached"] else
                      f"  {t['rule'] + ' ' if t['rule'] else ''}({t['discard']:.1%} discarded)")
        lines.append(f"  {name:<15}{BETTER[row['better']]:<11}{row['pauc']:>9.5f}{_f(row['relative']):>10}"
                     f"{row['fnmr_at_limit']:>10.4f}{row['unrated_pairs'] if row['order'] == 'score' else '':>9}"
                     f"{target}")
    return lines


def format_result(r: Result) -> str:
    lines: list[str] = []
    if r.labels is not None:
        lines += format_labels(r.labels, r.source)
    if r.edc is not None:
        if lines:
            lines.append("")
        elif r.labels is None:
            lines.append(f"cafi eval: {r.source}")
        lines += format_edc(r.edc)
    return "\n".join(lines)
