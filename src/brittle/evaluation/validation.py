"""Validate refusal judges against human labels (pyrit's refusal scorer evaluation sets).

``refusal.csv`` (105 rows) and ``refusal_extra.csv`` (64 rows) ship in the ``pyrit`` wheel
(``scorer_evals/refusal_scorer/``): ``objective, assistant_response, human_score`` with ``human_score`` 1 =
refusal. Positive class = refusal; a judge's ``degenerate`` verdict counts as "not refusal". Note that the
sets label *off-topic* answers (a response to another question) as refusals, which no text-only keyword
judge can see; the numbers are reported with and without those rows. A second, larger check uses
uncensorbench's 150 harmful prompts, each with a refusal and a compliant answer (labelled by construction).

Run ``python -m brittle.evaluation.validation [JUDGE ...] [--json FILE]`` to print the table.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ..io import BrittleError
from .judges import DEFAULT_JUDGE, get_judge

REFUSAL_SETS = ("refusal.csv", "refusal_extra.csv")


@dataclass(frozen=True)
class LabelledResponse:
    objective: str
    response: str
    refusal: bool  # human label
    off_topic: bool  # the response belongs to a different objective of the same file


def _read_rows(name: str) -> list[dict[str, str]]:
    from ..assets import dist_file

    path = dist_file("pyrit", f"scorer_evals/refusal_scorer/{name}")
    text = "".join(line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if not line.startswith("#"))
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"objective", "assistant_response", "human_score"} <= set(rows[0]):
        raise BrittleError(f"{path}: expected columns objective, assistant_response, human_score")
    return rows


def load_refusal_labels(name: str) -> list[LabelledResponse]:
    """Rows of one pyrit refusal set (comment lines starting with '#' skipped).

    ``off_topic`` marks the non-sequiturs the set's makers built by pasting an answer under another
    question: a row labelled refusal whose objective, or whose response, appears elsewhere in the two
    files labelled *not* refusal (i.e. answered properly / answering another question).
    """
    rows = _read_rows(name)
    ok_objectives, ok_responses = set(), set()
    for other in REFUSAL_SETS:
        for r in _read_rows(other):
            if int(float(r["human_score"])) == 0:
                ok_objectives.add(r["objective"].strip())
                ok_responses.add((r["assistant_response"].strip(), r["objective"].strip()))
    out = []
    for r in rows:
        resp, obj = r["assistant_response"].strip(), r["objective"].strip()
        label = int(float(r["human_score"])) == 1
        pasted = any(x == resp and o != obj for x, o in ok_responses)
        out.append(LabelledResponse(obj, resp, label, label and (obj in ok_objectives or pasted)))
    return out


def binary_metrics(pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(pred, gold, strict=True))
    n = tp + fp + fn + tn
    prec = tp / (tp + fp) if tp + fp else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
    return {"n": n, "accuracy": (tp + tn) / n if n else float("nan"), "precision": prec, "recall": rec, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def uncensorbench_pairs() -> list[LabelledResponse]:
    """uncensorbench's 150 harmful prompts, each with its refusal (label refusal) and its compliant answer
    (label not refusal): labelled by construction, 300 rows."""
    from ..data.sources import load_source

    refusals = load_source("uncensorbench")
    compliant = {e.prompt: e.response for e in load_source("uncensorbench-compliant")}
    out = []
    for e in refusals:
        out.append(LabelledResponse(e.prompt, e.response, True, False))
        if compliant.get(e.prompt):
            out.append(LabelledResponse(e.prompt, compliant[e.prompt], False, False))
    return out


def validate_judges(judges: Sequence[str] = (DEFAULT_JUDGE, "keyword-wei"),
                    sets: Sequence[str] = REFUSAL_SETS, uncensorbench: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """``{judge: {subset: metrics}}`` for each pyrit set, both together, both without the off-topic rows,
    and (if ``uncensorbench``) uncensorbench's refusal/compliant answer pairs."""
    data = {s: load_refusal_labels(s) for s in sets}
    data["pyrit, all"] = [x for s in sets for x in data[s]]
    data["pyrit, on-topic only"] = [x for x in data["pyrit, all"] if not x.off_topic]
    if uncensorbench:
        data["uncensorbench pairs"] = uncensorbench_pairs()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in judges:
        fn = get_judge(name)
        res = {}
        for subset, rows in data.items():
            verdicts = fn([r.objective for r in rows], [r.response for r in rows])
            m = binary_metrics([v == "refusal" for v in verdicts], [r.refusal for r in rows])
            m["degenerate"] = sum(v == "degenerate" for v in verdicts)
            res[subset] = m
        out[name] = res
    return out


def validation_markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| judge | set | n | accuracy | precision | recall | F1 | degenerate |", "|---|---|---|---|---|---|---|---|"]
    for judge, res in results.items():
        for subset, m in res.items():
            lines.append(f"| {judge} | {subset} | {m['n']} | {m['accuracy']:.3f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['f1']:.3f} | {m['degenerate']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m brittle.evaluation.validation",
                                 description="Accuracy/precision/recall of refusal judges on pyrit's human labels.")
    ap.add_argument("judges", nargs="*", default=[DEFAULT_JUDGE, "keyword-wei"])
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--errors", action="store_true", help="list the rows the first judge gets wrong")
    args = ap.parse_args(argv)
    try:
        res = validate_judges(args.judges)
    except BrittleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(validation_markdown(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    if args.errors:
        fn = get_judge(args.judges[0])
        for s in REFUSAL_SETS:
            rows = load_refusal_labels(s)
            for r, v in zip(rows, fn([r.objective for r in rows], [r.response for r in rows]), strict=True):
                if (v == "refusal") != r.refusal:
                    print(f"[{s}] human={'refusal' if r.refusal else 'not'} judge={v} off_topic={r.off_topic}: "
                          f"{r.response[:160]!r}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
