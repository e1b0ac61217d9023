"""Fixture data for tests and benchmarks: raypipe Parquet, a generation OUT folder,
LLaVA and StableLLaVA JSON, written as raypipe and those projects write them.

Each image is one flat colour (with a little noise) and every answer names that colour,
so a tiny LLaVA can only lower its loss by reading the image: memorisable, and a real
test of the vision path.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
}


def fixture_image(rng, colour: str, width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    base = np.array(FIXTURE_COLOURS[colour], dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _fixture_dialogue(rng, index: int) -> tuple[str, list[dict[str, str]]]:
    """(colour, LLaVA turns): one turn, or two for every third row."""
    colours = sorted(FIXTURE_COLOURS)
    colour = colours[int(rng.integers(len(colours)))]
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": f"It is a {colour} square."},
    ]
    if index % 3 == 2:
        asked = colours[int(rng.integers(len(colours)))]
        turns += [
            {"from": "human", "value": f"Is the square {asked}?"},
            {"from": "gpt", "value": "Yes." if asked == colour else "No."},
        ]
    return colour, turns


def write_fixture_parquet(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, rows_per_file: int = 64
) -> Path:
    """Write ``n`` raypipe-schema samples (SAMPLE_SCHEMA) as Parquet files in ``out_dir``.

    Images are ``image_size`` px PNGs of one colour; dialogues ask about that colour (every
    third row has a second turn). Same ``seed`` -> same bytes. Returns ``out_dir``.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from raypipe.schema import SAMPLE_SCHEMA, rows_to_table, sample_id

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, turns = _fixture_dialogue(rng, i)
        sid = sample_id(seed, "color", i)
        prompt = f"a (({colour})) square, flat colour"
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "keywords": [colour],
                "prompt": prompt,
                "negative_prompt": "",
                "seed": i,
                "image": {
                    "bytes": fixture_image(rng, colour, image_size, image_size),
                    "path": None,
                },
                "width": image_size,
                "height": image_size,
                "conversations": turns,
                "answer_keywords": [colour],
                "question_type": "wh",
                "sd_model": "raypipe-tiny/tiny-sd",
                "llm_model": "offline",
                "meta": "{}",
            }
        )
    for part, start in enumerate(range(0, max(n, 1), rows_per_file)):
        table = rows_to_table(rows[start : start + rows_per_file], SAMPLE_SCHEMA)
        pq.write_table(table, out_dir / f"part-{part:05d}.parquet")
    return out_dir


def write_fixture_run(
    out: str, n: int, seed: int = 0, image_size: int = 32, rows_per_part: int = 256
) -> str:
    """``n`` fixture samples written as a generation run writes them: through
    :class:`raypipe.generate.store.OutputStore` into ``OUT/data`` (parts of
    ``rows_per_part`` rows, the store's row groups), plus a ``manifest.json``. ``out`` may
    be a local folder or a URI. Returns ``out``."""
    import tempfile

    import pyarrow.parquet as pq

    from raypipe.generate.store import OutputStore

    store = OutputStore(out)
    store.makedirs()
    with tempfile.TemporaryDirectory() as tmp:
        write_fixture_parquet(tmp, n, seed=seed, image_size=image_size, rows_per_file=max(n, 1))
        table = pq.read_table(Path(tmp) / "part-00000.parquet")
    for start in range(0, n, rows_per_part):
        store.write_table("data", table.slice(start, rows_per_part))
    store.write_json("manifest.json", {"raypipe_manifest": 2, "accepted": n, "fixture": True})
    return out


def _write_fixture_images(folder: Path, rng, n: int, image_size: int):
    """n images under folder/images/ -> list of (relative path, colour, turns)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        colour, turns = _fixture_dialogue(rng, i)
        # Non-square images, so pad-to-square and crops have something to do.
        data = fixture_image(rng, colour, image_size + 8 * (i % 2), image_size)
        rel = f"images/{i:05d}.png"
        (folder / rel).write_bytes(data)
        items.append((rel, colour, turns))
    return items


def _write_corrupt_images(folder: Path) -> tuple[str, str]:
    """(undecodable image, missing image) paths relative to folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "corrupt.png").write_bytes(b"this is not an image")
    return "images/corrupt.png", "images/missing.png"


def write_fixture_llava_json(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, corrupt: bool = False
) -> Path:
    """LLaVA-format JSON (``[{"id","image","conversations"}]``) + images; returns the JSON path.

    Image paths are relative to ``out_dir`` (the JSON's folder, the default image folder).
    Every other row has ``<image>`` at the end of the first human turn instead of the start.
    With ``corrupt=True`` three bad rows follow: an undecodable image, a missing file, and a
    row whose conversation has no ``<image>``.
    """
    import numpy as np

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    records = []
    for i, (rel, _colour, turns) in enumerate(_write_fixture_images(out_dir, rng, n, image_size)):
        if i % 2 == 1:
            question = turns[0]["value"].replace("<image>\n", "")
            turns = [{"from": "human", "value": f"{question}\n<image>"}] + turns[1:]
        records.append({"id": f"llava-{i:05d}", "image": rel, "conversations": turns})
    if corrupt:
        bad, missing = _write_corrupt_images(out_dir)
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "It is a red square."},
        ]
        records += [
            {"id": "llava-undecodable", "image": bad, "conversations": turns},
            {"id": "llava-missing", "image": missing, "conversations": turns},
            {
                "id": "llava-no-image-token",
                "image": records[0]["image"] if records else bad,
                "conversations": [{"from": "human", "value": "What colour is it?"}, turns[1]],
            },
        ]
    path = out_dir / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_fixture_stablellava_json(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, corrupt: bool = False
) -> Path:
    """StableLLaVA release rows (``{"id","image","prompt","question","answer"}``) + images.

    Returns the JSON path; image paths are relative to its folder. ``corrupt=True`` adds an
    undecodable image and a missing file.
    """
    import numpy as np

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    records = []
    for i, (rel, colour, turns) in enumerate(_write_fixture_images(out_dir, rng, n, image_size)):
        records.append(
            {
                "id": f"stablellava-{i:05d}",
                "image": rel,
                "prompt": f"a (({colour})) square, flat colour",
                "question": turns[0]["value"].replace("<image>\n", ""),
                "answer": turns[1]["value"],
            }
        )
    if corrupt:
        bad, missing = _write_corrupt_images(out_dir)
        for sid, rel in (("stablellava-undecodable", bad), ("stablellava-missing", missing)):
            records.append(
                {
                    "id": sid,
                    "image": rel,
                    "prompt": "a ((red)) square",
                    "question": "What colour is the square?",
                    "answer": "It is a red square.",
                }
            )
    path = out_dir / "stablellava.json"
    path.write_text(json.dumps(records, indent=1))
    return path
