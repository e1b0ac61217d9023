"""In-context curation (paper section 4.3): 20 valid, pairwise-distinct, diverse examples
per ability, saved in a file the catalog loader reads back."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from raypipe.abilities import ABILITIES, load_catalog
from raypipe.llm.curation import (
    NEAR_DUPLICATE,
    curate_ability,
    curate_examples,
    prompt_similarity,
    save_curated,
)
from raypipe.llm.offline import OfflineBackend
from raypipe.llm.tasks import check_prompt, prompt_request

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def backend(catalog):
    return OfflineBackend(catalog=catalog)


def _mean_similarity(prompts: list[str]) -> float:
    pairs = list(itertools.combinations(prompts, 2))
    return sum(prompt_similarity(a, b) for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("name", ABILITIES)
def test_curation_returns_20_valid_distinct_examples(catalog, backend, name):
    ability = catalog[name]
    examples = curate_ability(ability, backend, rounds=6, per_request=10, seed=0)
    assert len(examples) == 20
    for example in examples:
        assert check_prompt(example) == (example, None)
    normalised = {" ".join(e.lower().split()) for e in examples}
    assert len(normalised) == 20
    for a, b in itertools.combinations(examples, 2):
        assert prompt_similarity(a, b) < NEAR_DUPLICATE, (a, b)
    assert examples == curate_ability(ability, backend, rounds=6, per_request=10, seed=0)


def test_selection_is_more_diverse_than_the_candidates(catalog, backend):
    ability = catalog["animal"]
    # Many prompts about few keywords: selection must spread over keywords and wording.
    requests = [
        prompt_request(ability, list(ability.keywords[:4]) * 5, key=f"c{s}", seed=s)
        for s in range(6)
    ]
    candidates = []
    for result in backend.complete_batch(requests):
        candidates += [line.split(". ", 1)[1] for line in result.text.splitlines()]
    chosen = curate_examples(ability, candidates, n=8, seed=0)
    assert len(chosen) == 8
    assert _mean_similarity(chosen) < _mean_similarity(candidates[:8])
    # The four keywords each appear twice before any third time.
    firsts = [c[2 : c.index("))")] for c in chosen]
    assert sorted(firsts) == sorted(list(ability.keywords[:4]) * 2)


def test_invalid_and_duplicate_candidates_are_dropped(catalog):
    color = catalog["color"]
    good = [
        "((crimson)) vintage car, city street at midday, realistic photo, natural daylight, 8k",
        "((teal)) umbrella, rainy park, grey sky, realistic photo, soft diffuse light, 8k",
        "((ochre)) ceramic vase, white marble table, sunlit kitchen, DSLR photo, 4k",
    ]
    candidates = [
        good[0],
        "crimson vintage car, city street, realistic photo, 8k",  # no brackets
        "vintage ((crimson)) car, city street, realistic photo, 8k",  # keyword not first
        "((teal)) umbrella",  # too short
        good[1],
        good[0].upper().replace("((CRIMSON))", "((crimson))"),  # exact duplicate (case)
        good[1].replace("8k", "4k"),  # near duplicate
        f'"{good[2]}."',  # valid once normalised
    ]
    assert curate_examples(color, candidates, n=20) == good
    assert curate_examples(color, [], n=20) == []


def test_seed_changes_the_selection(catalog, backend):
    vehicle = catalog["vehicle"]
    a = curate_ability(vehicle, backend, rounds=6, per_request=10, seed=0)
    b = curate_ability(vehicle, backend, rounds=6, per_request=10, seed=1)
    assert a != b


def test_saved_file_reloads_through_the_catalog(catalog, backend, tmp_path):
    color = catalog["color"]
    examples = curate_ability(color, backend, seed=3)
    shutil.copy(color.source, tmp_path / "color.yaml")
    path = save_curated("color", examples, tmp_path)
    assert path == tmp_path / "color.curated.yaml"
    text = path.read_text()
    assert text.startswith("# Curated in-context examples") and "Review and edit" in text

    reloaded = load_catalog([tmp_path], names=["color"])["color"]
    assert reloaded.curated_examples == tuple(examples)
    assert reloaded.icl_examples == tuple(examples)
    # The prompt template now shows the curated set instead of the seeds.
    user = prompt_request(reloaded, ["teal"], key="k").messages[1]["content"]
    assert examples[0] in user and color.sd_examples[0] not in user


def test_curate_job(tmp_path, capsys):
    from raypipe.jobs import curate as job

    assert job.main(["--abilities", "color,hair", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["color.curated.yaml", "hair.curated.yaml"]
    assert job.main(["--abilities", "colour", "--out", str(tmp_path)]) == 2
    assert "unknown ability 'colour'" in capsys.readouterr().err
