"""What an ability is: the catalog's constants, :class:`Ability` and its examples and
templates, and the article fixer their text uses. :mod:`raypipe.abilities.loader` reads
and validates the files (the catalog format: :mod:`raypipe.abilities`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: The paper's abilities, in the paper's order.
ABILITIES: tuple[str, ...] = (
    "color",
    "animal",
    "plant",
    "vehicle",
    "food",
    "clothes",
    "furniture",
    "hair",
    "profession",
    "scene",
    "action",
    "art_style",
    "abnormal",
)

#: Benchmark question types (paper Fig. 5). Every ability covers all three.
QUESTION_TYPES: tuple[str, ...] = ("yes_no", "wh", "either_or")
#: Question types of training dialogues (the ``question_type`` field of an ability).
DIALOGUE_QUESTION_TYPES: tuple[str, ...] = ("caption", "unusual")

#: Fewest items each list field may hold (see the catalog format).
MIN_ITEMS: dict[str, int] = {
    "cautions": 3,
    "keywords": 40,
    "subjects": 15,
    "scenes": 10,
    "styles": 6,
    "sd_examples": 5,
    "questions": 10,
    "dialogue_examples": 3,
    "benchmark_examples": 3,
    "benchmark_templates": 3,
}

#: Placeholders a benchmark template may use; ``other`` is a distractor keyword.
TEMPLATE_PLACEHOLDERS: tuple[str, ...] = ("keyword", "subject", "other")
#: Placeholders ``phrase`` may use; ``keyword`` is required.
PHRASE_PLACEHOLDERS: tuple[str, ...] = ("keyword", "subject")
#: Placeholders of ``explanation_sentence``; ``a_keyword`` is the keyword after "a"/"an".
EXPLANATION_PLACEHOLDERS: tuple[str, ...] = ("keyword", "a_keyword")

CURATED_SUFFIX = ".curated.yaml"


@dataclass(frozen=True)
class DialogueExample:
    """A raw SD prompt and a description focused on its bracketed keyword."""

    prompt: str
    description: str


@dataclass(frozen=True)
class BenchmarkExample:
    """A benchmark item: the SD prompt, a question about its image and the reference answer."""

    prompt: str
    question: str
    question_type: str  # one of QUESTION_TYPES
    answer: str
    answer_keywords: tuple[str, ...]  # lowercase; a correct answer contains one of them


@dataclass(frozen=True)
class BenchmarkTemplate:
    """A question/answer pattern with ``{keyword}``, ``{subject}`` and ``{other}`` placeholders.

    The offline writer fills it to produce exact reference answers.
    """

    question_type: str  # one of QUESTION_TYPES
    question: str
    answer: str
    answer_keywords: tuple[str, ...]

    def render(self, keyword: str, subject: str, other: str = "") -> BenchmarkTemplate:
        """Return a copy with every placeholder filled (``other``: a distractor keyword)."""
        if not other and "{other}" in self.question + self.answer:
            raise ValueError(f"template {self.question!r} needs a distractor: pass other=...")
        values = {"keyword": keyword, "subject": subject, "other": other}
        return BenchmarkTemplate(
            question_type=self.question_type,
            question=fix_articles(self.question.format(**values)),
            answer=fix_articles(self.answer.format(**values)),
            answer_keywords=tuple(k.format(**values).lower() for k in self.answer_keywords),
        )


@dataclass(frozen=True)
class Ability:
    """One ability of the catalog, as validated from ``<name>.yaml``."""

    name: str  # equals the file stem, e.g. "color"
    display_name: str  # e.g. "Color"
    description: str  # one sentence: what visual ability this teaches
    cautions: tuple[str, ...]  # ability-specific cautions for the SD prompt template
    keywords: tuple[str, ...]  # seed keywords, lowercase and distinct
    subjects: tuple[str, ...]  # what a keyword combines with (see ``phrase``)
    scenes: tuple[str, ...]  # scene/setting phrases
    styles: tuple[str, ...]  # rendering style phrases
    phrase: str  # how keyword and subject read together, e.g. "{keyword} {subject}"
    sd_examples: tuple[str, ...]  # seed in-context SD prompts, each starting "((keyword))"
    questions: tuple[str, ...]  # description question pool for dialogues
    dialogue_examples: tuple[DialogueExample, ...]
    benchmark_examples: tuple[BenchmarkExample, ...]
    benchmark_templates: tuple[BenchmarkTemplate, ...]
    curated_examples: tuple[str, ...] | None  # from <name>.curated.yaml, when present
    source: Path  # the file it was loaded from
    # Optional text particular to the ability (see the module docstring).
    question_type: str = "caption"  # training rows' question_type: caption or unusual
    dialogue_focus: str = ""  # extra dialogue-template requirement; may use {keyword}
    focus_sentences: tuple[str, ...] = ()  # offline writer: keyword-focus sentences
    explanation_sentence: str = ""  # offline writer: e.g. why it is unusual
    keyword_is_setting: bool = False  # the keyword is the place shown (scene)

    @property
    def icl_examples(self) -> tuple[str, ...]:
        """The in-context SD prompt examples to use: the curated set if any, else the seeds."""
        return self.curated_examples if self.curated_examples is not None else self.sd_examples

    @property
    def curated_path(self) -> Path:
        """Where this ability's curated examples live (the file may not exist)."""
        return curated_path_for(self.source)

    def describe(self, keyword: str, subject: str) -> str:
        """Combine a keyword and a subject in natural language, e.g. "crimson vintage car"."""
        return fix_articles(self.phrase.format(keyword=keyword, subject=subject))


_ARTICLE_RE = re.compile(r"\b([Aa])n? (?=([A-Za-z][\w-]*))")
# Words whose sound disagrees with their first letter.
_A_BEFORE_VOWEL = ("uni", "use", "usu", "ute", "eu", "one", "once", "ukulele")
_AN_BEFORE_CONSONANT = ("hour", "honest", "honour", "heir")


def fix_articles(text: str) -> str:
    """Make each "a"/"an" agree with the next word: "a emperor penguin" -> "an emperor penguin".

    Templates write "a {keyword}"; the keyword decides which article reads right.
    """

    def choose(m: re.Match[str]) -> str:
        word = m.group(2).lower()
        vowel_sound = (word[0] in "aeiou" and not word.startswith(_A_BEFORE_VOWEL)) or (
            word.startswith(_AN_BEFORE_CONSONANT)
        )
        article = m.group(1) + ("n" if vowel_sound else "")
        return article + " "

    return _ARTICLE_RE.sub(choose, text)


def default_data_dir() -> Path:
    """The directory of the ability files shipped with raypipe."""
    return Path(__file__).resolve().parent / "data"


def curated_path_for(ability_path: str | Path) -> Path:
    """``.../color.yaml`` -> ``.../color.curated.yaml``."""
    path = Path(ability_path)
    return path.with_name(path.stem + CURATED_SUFFIX)
