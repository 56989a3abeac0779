"""One table over several seeds of the toy benchmark: every run that all the given results files
share, each number as seed 0 / seed 1 / ... (the files' order). Files from different machines (their
``versions.cpu_model``) are labelled with the machine, so one seed on two machines can be compared, and
files whose runs were given other options (``train_args``) with those options.

    python -m wpn_dist.bench.seeds docs/toybench/seed0.json docs/toybench/seed1.json docs/toybench/seed2.json
"""
import json
import sys

SPLITS = ("id", "ood", "adversarial", "prefill")
# (header, value in %, decimals): the degenerate share gets one decimal, its target being 1%.
COLUMNS = [("ID", lambda a: a["harmless_rate"]["id"]["rate"] * 100, 0),
           ("OOD", lambda a: a["harmless_rate"]["ood"]["rate"] * 100, 0),
           ("adversarial", lambda a: a["harmless_rate"]["adversarial"]["rate"] * 100, 0),
           ("worst attack", lambda a: min(v["rate"] for k, v in a["harmless_rate"].items()
                                          if k.startswith("adversarial/")) * 100, 0),
           ("prefill", lambda a: a["harmless_rate"]["prefill"]["rate"] * 100, 0),
           ("worst depth", lambda a: min(v["rate"] for k, v in a["harmless_rate"].items()
                                         if k.startswith("prefill/")) * 100, 0),
           ("degenerate (worst split)", lambda a: max(a["degenerate_rate"][s]["rate"] for s in SPLITS
                                                      if s in a["degenerate_rate"]) * 100, 1),
           ("QA", lambda a: a["qa_accuracy"]["rate"] * 100, 0)]


def table(results: list) -> str:
    names = [r["name"] for r in results[0]["runs"] if not r["failed"]]
    for other in results[1:]:
        present = {r["name"] for r in other["runs"] if not r["failed"]}
        names = [n for n in names if n in present]
    # Files from other machines, or whose runs were all given other options (--train_args): say which is which.
    machines = [r.get("versions", {}).get("cpu_model") for r in results]
    extras = [" ".join(r.get("train_args", [])) for r in results]
    labels = [str(r["seed"]) for r in results]
    if len(set(machines)) > 1:
        labels = [f"{label} on {machine}" for label, machine in zip(labels, machines)]
    if len(set(extras)) > 1:
        labels = [f"{label} with `{extra}`" if extra else label for label, extra in zip(labels, extras)]
    seeds = " / ".join(labels)
    head = ["run"] + [name for name, _, _ in COLUMNS] + ["relearned @5", "relearned @20"]
    lines = [f"Each cell: seed {seeds}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(evaluations, relearns):
        out = [" / ".join(f"{f(a):.{digits}f}" for a in evaluations) for _, f, digits in COLUMNS]
        for step in ("5", "20"):
            out.append(" / ".join(f"{100 * r[step]:.0f}" for r in relearns))
        return out
    lines.append("| before unlearning | " + " | ".join(cells([r["before"] for r in results],
                                                            [r["before_relearn"] for r in results])) + " |")
    for name in names:
        runs = [next(x for x in r["runs"] if x["name"] == name) for r in results]
        lines.append(f"| {name} | " + " | ".join(cells([x["after"] for x in runs],
                                                      [{str(k): v for k, v in x["relearn"].items()} for x in runs])) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    print(table(results))


if __name__ == "__main__":
    main()
