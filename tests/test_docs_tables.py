"""The toy benchmark's numbers in the docs are the committed results files' own: docs/toybench/seed*.md
are what the benchmark writes from seed*.json, seeds.md is wpn_dist.bench.seeds' table of them, and
every row of the README's two efficacy tables is a row of those files."""
import json
import os

import pytest

from conftest import REPO
from wpn_dist.app import kernels
from wpn_dist.bench import seeds, toybench

DOCS = os.path.join(REPO, "docs", "toybench")
SEEDS = ("seed0", "seed1", "seed2", "seed3", "seed4")  # the seeds table
# Every committed results file: the tables and seeds 5-9's check of the defaults (the tamper term tuned on
# seeds 0-5), made on the toy world's fixed CPU kernels, and seed 0's `wpn earlier` and sft rows on this
# machine's own kernels (torch's AVX512 ones) and with torch's AVX2 kernels alone, to show what the fixed
# kernels are for.
CHECKS = ("seed5", "seed6", "seed7", "seed8", "seed9")
RENDERED = SEEDS + CHECKS + ("seed0-native", "seed0-avx2")


def results(name: str) -> dict:
    with open(os.path.join(DOCS, f"{name}.json")) as f:
        return json.load(f)


def read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def with_int_steps(results: dict) -> dict:
    """The results as the benchmark holds them before writing: JSON made the relearning steps strings."""
    out = dict(results, before_relearn={int(k): v for k, v in results["before_relearn"].items()})
    out["runs"] = [dict(r, relearn={int(k): v for k, v in r["relearn"].items()}) if "relearn" in r else r
                   for r in results["runs"]]
    return out


@pytest.mark.parametrize("name", RENDERED)
def test_each_seed_table_is_its_results_file_rendered(name):
    committed = results(name)
    assert read(f"docs/toybench/{name}.md") == toybench.markdown(with_int_steps(committed)) + "\n"
    assert committed["versions"]["torch"] and f"seed{committed['seed']}" == name.split("-")[0]


@pytest.mark.parametrize("name", RENDERED)
def test_each_committed_row_ran_the_options_its_name_stands_for_now(name):
    """A row's name is what the toybench would run under it today (its ablation entry, or the method with
    the benchmark's own options): a renamed or redefined row must be remade or reused under its new name."""
    for run in results(name)["runs"]:
        if run["name"] in toybench.ABLATION:
            assert run["args"] == ["--method", "wpn"] + toybench.ABLATION[run["name"]], run["name"]
        elif run["name"] in toybench.REFERENCES:
            assert run["args"] == toybench.REFERENCES[run["name"]], run["name"]
        elif "args" in run:  # the oracles have none
            assert run["args"] == ["--method", run["name"]] + toybench.toy_options(run["name"]), run["name"]


def test_the_tables_were_made_on_the_fixed_kernels_and_the_comparison_on_the_machines_own():
    for name in SEEDS + CHECKS:
        assert results(name)["versions"]["cpu_kernels"] == kernels.PINNED, name
    native = results("seed0-native")["versions"]
    assert native["cpu_kernels"] == dict.fromkeys(kernels.PINNED) and native["cpu_capability"] == "AVX512"
    assert results("seed0-avx2")["versions"]["cpu_capability"] == "AVX2"


def test_a_fresh_implant_is_the_model_the_committed_tables_start_from(tmp_path):
    """Seed 0 implanted afresh on the toy world's fixed kernels (the full implant, on whatever CPU runs
    the tests) is the model seed0.json's runs unlearned: the same last loss and weights."""
    from test_toy_determinism import implant_in_subprocess
    from wpn_dist.app.toy_world import ImplantConfig
    made = implant_in_subprocess(1, str(tmp_path / "cache"), steps=ImplantConfig().steps, pinned=True)
    assert made["fingerprint"] == results("seed0")["implant"]


def test_the_seeds_table_is_made_from_the_committed_results():
    assert seeds.table([results(s) for s in SEEDS]) in read("docs/toybench/seeds.md")


def readme_tables() -> dict:
    """{header line: [row lines]} of every markdown table in the README."""
    tables, header = {}, None
    for line in read("README.md").splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line
            tables[header] = []
        elif not line.startswith("|---"):
            tables[header].append(line)
    return tables


def test_the_readme_efficacy_tables_copy_the_committed_rows():
    tables = readme_tables()
    for header_start, source in (("| run | harmless id |", "docs/toybench/seed0.md"),
                                 ("| run | ID | OOD |", "docs/toybench/seeds.md")):
        headers = [h for h in tables if h.startswith(header_start)]
        assert len(headers) == 1, headers
        rows = tables[headers[0]]
        lines = set(read(source).splitlines())
        assert headers[0] in lines and len(rows) >= 10
        assert [r for r in rows if r not in lines] == []
