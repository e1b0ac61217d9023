"""The ability catalog: one YAML file per ability, loaded and validated into :class:`Ability`.

Each file ``<name>.yaml`` holds what the templates need for one ability of the StableLLaVA
method: cautions, seed keywords, subjects/scenes/styles, in-context SD prompts, the
question pool, dialogue and benchmark examples, and benchmark templates. The package ships
the paper's 13 abilities in ``raypipe/abilities/data/``; a user adds or overrides an ability
by putting one file in a directory passed to :func:`load_catalog`.

Optional fields carry what is particular to an ability's *text*, so an ability a user adds
gets it too, with no code change (defaults in brackets):

``question_type`` (``caption``)
    The ``question_type`` column of the ability's training rows: ``caption`` (a
    description), or ``unusual`` (the answer says what is odd and why, as for *abnormal*).
``dialogue_focus`` (none)
    One more requirement for the dialogue template, appended to its numbered list, e.g.
    "Say clearly what is unusual in the image and why". May use ``{keyword}``.
``focus_sentences`` (the offline writer's generic ones)
    Sentences the offline writer picks from to put the keyword in focus; each uses
    ``{keyword}``, e.g. "Its {keyword} colour is the most vivid in the picture."
``explanation_sentence`` (none)
    A sentence the offline writer adds after the focus sentence, e.g. why the image is
    unusual. May use ``{keyword}`` and ``{a_keyword}`` (the keyword with "a"/"an").
``keyword_is_setting`` (false)
    The keyword names the place itself (*scene*); the offline writer then adds the
    ability's ``scenes`` (moods, framing) as "with ..." rather than "... as the setting".

An optional sibling ``<name>.curated.yaml`` (written by raypipe's curation, editable by hand)
replaces the seed in-context examples: :attr:`Ability.icl_examples` prefers it.

Every problem in a file raises :class:`raypipe.errors.CatalogError` naming the file and the
field, e.g. ``color.yaml: field 'keywords': needs at least 40 items, got 12. ...``.
"""

from raypipe.abilities.loader import load_ability, load_catalog
from raypipe.abilities.model import (
    ABILITIES,
    DIALOGUE_QUESTION_TYPES,
    MIN_ITEMS,
    QUESTION_TYPES,
    Ability,
    BenchmarkExample,
    BenchmarkTemplate,
    DialogueExample,
    default_data_dir,
    fix_articles,
)

__all__ = [
    "ABILITIES",
    "DIALOGUE_QUESTION_TYPES",
    "MIN_ITEMS",
    "QUESTION_TYPES",
    "Ability",
    "BenchmarkExample",
    "BenchmarkTemplate",
    "DialogueExample",
    "default_data_dir",
    "fix_articles",
    "load_ability",
    "load_catalog",
]
