"""The ability catalog: every shipped file validates; broken files fail with teaching errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from raypipe.abilities import (
    ABILITIES,
    MIN_ITEMS,
    QUESTION_TYPES,
    Ability,
    default_data_dir,
    fix_articles,
    load_ability,
    load_catalog,
)
from raypipe.errors import CatalogError


def _color_raw() -> dict:
    return yaml.safe_load((default_data_dir() / "color.yaml").read_text(encoding="utf-8"))


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# --- the shipped catalog -------------------------------------------------------------------


@pytest.mark.parametrize("name", ABILITIES)
def test_shipped_ability_loads_and_validates(name):
    path = default_data_dir() / f"{name}.yaml"
    assert path.is_file(), f"the paper's ability {name!r} has no data file at {path}"
    ability = load_ability(path)

    assert ability.name == name and ability.source == path
    for field, minimum in MIN_ITEMS.items():
        assert len(getattr(ability, field)) >= minimum, field
    assert len({k.lower() for k in ability.keywords}) == len(ability.keywords)
    assert all(p.startswith("((") for p in ability.sd_examples)
    assert {b.question_type for b in ability.benchmark_examples} == set(QUESTION_TYPES)
    assert {t.question_type for t in ability.benchmark_templates} == set(QUESTION_TYPES)
    assert ability.keywords[0] in ability.describe(ability.keywords[0], ability.subjects[0])
    # Templates fill without leftover braces and keep the keyword as the reference answer.
    keyword, other = ability.keywords[0], ability.keywords[1]
    for template in ability.benchmark_templates:
        filled = template.render(keyword, ability.subjects[0], other)
        assert "{" not in filled.question + filled.answer
        assert keyword.lower() in filled.answer.lower()


def test_ability_specific_text_lives_in_the_files():
    catalog = load_catalog()
    abnormal = catalog["abnormal"]
    assert abnormal.question_type == "unusual"
    assert "unusual" in abnormal.dialogue_focus and "why" in abnormal.dialogue_focus
    assert "{a_keyword}" in abnormal.explanation_sentence
    assert catalog["scene"].keyword_is_setting
    # The rest use the defaults unless their file says otherwise.
    assert catalog["animal"].question_type == "caption"
    assert (catalog["animal"].dialogue_focus, catalog["animal"].focus_sentences) == ("", ())
    assert not catalog["animal"].keyword_is_setting
    for name in ("color", "action", "profession", "scene", "art_style", "abnormal"):
        assert all("{keyword}" in s for s in catalog[name].focus_sentences), name
        assert catalog[name].focus_sentences, name
    # Dialogue question types are sample question types (raypipe.schema).
    from raypipe.abilities import DIALOGUE_QUESTION_TYPES
    from raypipe.schema import QUESTION_TYPES as SAMPLE_QUESTION_TYPES

    assert set(DIALOGUE_QUESTION_TYPES) <= set(SAMPLE_QUESTION_TYPES)


def test_catalog_holds_the_papers_abilities_in_order():
    assert list(load_catalog()) == list(ABILITIES)


def test_ability_is_immutable():
    ability = load_catalog(names=["color"])["color"]
    assert isinstance(ability, Ability)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ability.name = "colour"  # type: ignore[misc]


def test_describe_and_render_read_naturally():
    color = load_catalog(names=["color"])["color"]
    assert color.describe("teal", "umbrella") == "teal umbrella"
    wh = next(t for t in color.benchmark_templates if t.question_type == "wh")
    filled = wh.render("teal", "umbrella", "crimson")
    assert filled.question == "What colour is the umbrella?"
    assert filled.answer_keywords == ("teal",)
    either = next(t for t in color.benchmark_templates if t.question_type == "either_or")
    assert "teal" in either.render("teal", "umbrella", "crimson").question
    assert "crimson" in either.render("teal", "umbrella", "crimson").question


def test_fix_articles():
    assert fix_articles("Is there a emperor penguin?") == "Is there an emperor penguin?"
    assert fix_articles("It is an tiger and a ottoman.") == "It is a tiger and an ottoman."
    assert fix_articles("A unicycle, a hour, An zebra") == "A unicycle, an hour, A zebra"


# --- broken files ----------------------------------------------------------------------------


def _drop(key):
    def mutate(raw):
        del raw[key]

    return mutate


def _set(key, value):
    def mutate(raw):
        raw[key] = value

    return mutate


def _set_item(key, index, field, value):
    def mutate(raw):
        raw[key][index][field] = value

    return mutate


def _no_either_or_templates(raw):
    raw["benchmark_templates"] = [
        t for t in raw["benchmark_templates"] if t["question_type"] != "either_or"
    ] + [raw["benchmark_templates"][0]]


def _duplicate_keyword(raw):
    raw["keywords"].append(" " + raw["keywords"][3] + " ")


def _keywords_first(n):
    def mutate(raw):
        raw["keywords"] = raw["keywords"][:n]

    return mutate


BROKEN = {
    "missing field": (_drop("keywords"), "field 'keywords': missing"),
    "list is a string": (_set("keywords", "crimson, teal"), "field 'keywords': expected a list"),
    "number for a string": (_set("display_name", 42), "field 'display_name': expected a string"),
    "too few keywords": (
        _keywords_first(12),
        "field 'keywords': needs at least 40 items, got 12. Add keywords",
    ),
    "duplicate keyword": (_duplicate_keyword, "duplicate of keywords[3]"),
    "uppercase keyword": (
        lambda raw: raw["keywords"].__setitem__(0, "Crimson"),
        "field 'keywords[0]': 'Crimson' must be lowercase",
    ),
    "sd_example without ((keyword))": (
        lambda raw: raw["sd_examples"].__setitem__(0, "crimson vintage car, city street, 8k"),
        "field 'sd_examples[0]'",
    ),
    "unknown question_type": (
        _set_item("benchmark_examples", 0, "question_type", "multiple_choice"),
        "field 'benchmark_examples[0].question_type': 'multiple_choice' is not one of",
    ),
    "missing question type": (_no_either_or_templates, "field 'benchmark_templates': no item"),
    "unknown placeholder": (
        _set_item("benchmark_templates", 0, "question", "Is the {colour} {keyword}?"),
        "field 'benchmark_templates[0].question': unknown placeholder {colour}",
    ),
    "unquoted yes": (
        _set_item("benchmark_examples", 1, "answer_keywords", [True]),
        "field 'benchmark_examples[1].answer_keywords[0]'",
    ),
    "phrase without keyword": (_set("phrase", "{subject}"), "field 'phrase': must contain"),
    "unknown field": (_set("keyword", ["crimson"]), "field 'keyword': unknown field"),
    "name mismatch": (_set("name", "colour"), "field 'name': 'colour' must equal the file"),
    "unknown dialogue question_type": (
        _set("question_type", "yes_no"),
        "field 'question_type': 'yes_no' is not one of caption, unusual",
    ),
    "focus sentence without keyword": (
        _set("focus_sentences", ["A very vivid colour."]),
        "field 'focus_sentences[0]': must contain the placeholder {keyword}",
    ),
    "focus sentences not a list": (
        _set("focus_sentences", "Its {keyword} colour is vivid."),
        "field 'focus_sentences': expected a list of strings",
    ),
    "explanation placeholder": (
        _set("explanation_sentence", "It is {an_keyword}."),
        "field 'explanation_sentence': unknown placeholder {an_keyword}",
    ),
    "dialogue focus placeholder": (
        _set("dialogue_focus", "Name the {colour}."),
        "field 'dialogue_focus': unknown placeholder {colour}",
    ),
    "setting flag as text": (
        _set("keyword_is_setting", "yes please"),
        "field 'keyword_is_setting': expected true or false",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_file_names_file_and_field(tmp_path, case):
    mutate, expected = BROKEN[case]
    raw = _color_raw()
    mutate(raw)
    path = _write(tmp_path / "color.yaml", raw)

    with pytest.raises(CatalogError) as excinfo:
        load_ability(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: field "), message
    assert expected in message


def test_broken_user_file_fails_the_catalog(tmp_path):
    raw = _color_raw()
    raw["keywords"] = raw["keywords"][:5]
    _write(tmp_path / "color.yaml", raw)
    with pytest.raises(CatalogError, match=r"color\.yaml: field 'keywords': needs at least 40"):
        load_catalog([tmp_path])


def test_error_shows_path_relative_to_working_directory(tmp_path, monkeypatch):
    raw = _color_raw()
    raw["keywords"] = raw["keywords"][:12]
    _write(tmp_path / "abilities" / "color.yaml", raw)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CatalogError) as excinfo:
        load_ability("abilities/color.yaml")
    assert str(excinfo.value).startswith(
        "abilities/color.yaml: field 'keywords': needs at least 40 items, got 12."
    )


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "color.yaml"
    path.write_text("name: color\nkeywords: [crimson, teal\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_ability(path)


# --- user directories, names, curated examples -------------------------------------------------


def test_user_dir_adds_an_ability(tmp_path):
    raw = _color_raw()
    raw.update(name="texture", display_name="Texture")
    raw["keywords"] = [f"texture {i}" for i in range(40)]
    _write(tmp_path / "texture.yaml", raw)

    catalog = load_catalog([tmp_path])
    assert list(catalog)[-1] == "texture"
    assert len(catalog) == len(load_catalog()) + 1
    assert catalog["texture"].display_name == "Texture"
    assert catalog["texture"].source == tmp_path / "texture.yaml"
    assert list(load_catalog([tmp_path], names=["texture", "color"])) == ["texture", "color"]


def test_user_dir_overrides_by_name(tmp_path):
    raw = _color_raw()
    raw["display_name"] = "Colour"
    _write(tmp_path / "color.yaml", raw)
    color = load_catalog([str(tmp_path)], names=["color"])["color"]
    assert color.display_name == "Colour"
    assert color.source == tmp_path / "color.yaml"


def test_unknown_ability_lists_known_ones():
    with pytest.raises(CatalogError) as excinfo:
        load_catalog(names=["colour"])
    message = str(excinfo.value)
    assert "unknown ability 'colour'" in message
    assert "color" in message and "furniture" in message


def test_missing_user_dir(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog([tmp_path / "nope"])


def test_curated_examples_replace_the_seeds(tmp_path):
    raw = _color_raw()
    path = _write(tmp_path / "color.yaml", raw)
    assert load_ability(path).curated_examples is None
    assert load_ability(path).icl_examples == tuple(raw["sd_examples"])

    curated = [f"((teal)) object {i}, white studio, realistic photo, 8k" for i in range(6)]
    _write(tmp_path / "color.curated.yaml", {"ability": "color", "examples": curated})
    ability = load_catalog([tmp_path], names=["color"])["color"]
    assert ability.curated_examples == tuple(curated)
    assert ability.icl_examples == tuple(curated)
    assert ability.curated_path == tmp_path / "color.curated.yaml"
    # The curated file is not mistaken for an ability of its own.
    assert "color.curated" not in load_catalog([tmp_path])


@pytest.mark.parametrize(
    ("curated", "field"),
    [
        ({"ability": "color", "examples": ["teal object, studio"] * 6}, "'examples[0]'"),
        ({"ability": "animal", "examples": ["((teal)) a"] * 6}, "'ability'"),
        ({"ability": "color", "examples": ["((teal)) a", "((teal)) b"]}, "'examples'"),
    ],
)
def test_bad_curated_file_names_file_and_field(tmp_path, curated, field):
    path = _write(tmp_path / "color.yaml", _color_raw())
    curated_path = _write(tmp_path / "color.curated.yaml", curated)
    with pytest.raises(CatalogError) as excinfo:
        load_ability(path)
    assert str(excinfo.value).startswith(f"{curated_path}: field {field}")
