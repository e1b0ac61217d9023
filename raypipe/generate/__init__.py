"""Generation job: keywords -> SD prompts -> dedup -> dialogues -> render -> quality -> Parquet."""
