r"""Curate in-context SD prompt examples per ability (StableLLaVA section 4.3).

    raypipe curate --abilities color,animal --out raypipe/abilities/data
    raypipe curate --config sd15-openai --out my_abilities \
        --rounds 10 --per-request 10 llm.model=gpt-4o-mini

For each ability: the LLM writes rounds x per-request SD prompts from the ability's seed
examples; the valid ones are de-duplicated and N (default 20) are picked for diversity and
written to OUT/<ability>.curated.yaml, a file to review and edit. Put it next to the
ability's file (the package's raypipe/abilities/data/ or a directory in the run's
catalog_dirs) and later runs use it as the prompt template's in-context examples.

The LLM is the config's `llm` section (default: the offline writer, a template filler that
needs no key; use an openai preset for real curation). Any config field can be overridden
as dotted.path=value.
"""

from __future__ import annotations

import argparse
import logging
import sys

from raypipe.abilities import MIN_ITEMS, load_catalog
from raypipe.config import load_config
from raypipe.generate.config import GenerateConfig
from raypipe.jobs import guarded
from raypipe.llm.config import LLMConfig
from raypipe.llm.curation import curate_ability, save_curated


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder for <ability>.curated.yaml files")
    p.add_argument("--abilities", help="comma-separated abilities (default: all)")
    p.add_argument(
        "--config", help="generation preset (name or YAML path) whose `llm` section picks the LLM"
    )
    p.add_argument("--rounds", type=int, default=6, help="prompt requests per ability")
    p.add_argument("--per-request", type=int, default=10, help="prompts per request")
    p.add_argument("--n", type=int, default=20, help="examples to keep per ability")
    p.add_argument("--seed", type=int, default=0, help="seed for keywords and selection")
    p.add_argument("--cache-dir", help="LLM response cache folder (openai backend)")
    p.add_argument("overrides", nargs="*", help="dotted.field=value overrides")
    return p.parse_args(argv)


def make_curation_backend(llm: LLMConfig, catalog: dict, cache_dir: str | None):
    if llm.backend == "offline":
        from raypipe.llm.offline import OfflineBackend

        return OfflineBackend(llm, catalog)
    from raypipe.llm import make_backend

    return make_backend(llm, cache_dir)


@guarded
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(GenerateConfig, args.config, args.overrides)
    names = [a.strip() for a in args.abilities.split(",")] if args.abilities else cfg.abilities
    catalog = load_catalog(cfg.catalog_dirs or None, names)
    backend = make_curation_backend(cfg.llm, catalog, args.cache_dir)

    short = []
    try:
        for name, ability in catalog.items():
            examples = curate_ability(
                ability,
                backend,
                rounds=args.rounds,
                per_request=args.per_request,
                seed=args.seed,
                n=args.n,
                temperature=cfg.llm.temperature,
            )
            if len(examples) < MIN_ITEMS["sd_examples"]:
                short.append(name)
                print(f"{name}: only {len(examples)} valid distinct prompts; nothing written")
                continue
            path = save_curated(name, examples, args.out)
            print(f"{name}: {len(examples)} examples -> {path}")
            if len(examples) < args.n:
                short.append(name)
    finally:
        backend.close()
    print(f"llm: {backend.stats()}")
    if short:
        print(
            f"raypipe: fewer than {args.n} examples for {', '.join(short)}; raise --rounds "
            "or --per-request (the log shows how many prompts were rejected and why).",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
