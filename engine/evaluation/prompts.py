"""Readers for the prompt files of the standard erasure benchmarks.

One reader, `load_prompt_csv`, takes the CSV layouts in use and finds its columns by name
(compared case-insensitively, with `_`, `-` and spaces treated alike):

| benchmark | prompt | seed | guidance | categories |
| --- | --- | --- | --- | --- |
| I2P (Hugging Face release) | `prompt` | `sd_seed` | `sd_guidance_scale` | `categories` |
| I2P subsets as shipped by UnlearnDiffAtk (`nudity.csv`, `i2p.csv`, ...) | `prompt` | `evaluation_seed` | `evaluation_guidance` | `categories` |
| Ring-A-Bell (`prompt,case_number,evaluation_seed`) | `prompt` | `evaluation_seed` | | |
| MMA-Diffusion | `adv_prompt` (or `target_prompt`) | | | |
| others | `prompt`, `adv_prompt`, `sensitive prompt`, `target_prompt` or `text` | `seed` | | `category`, `label`, `concept` |

The first candidate present wins (in the order of the table's lists); `prompt_column=` picks
another. I2P's `categories` cell is a comma-separated list (`"shocking, sexual"`). A
`case_number` column is kept as the row's identifier. Every other column (`Unnamed: 0`,
`sd_image_width`, the I2P statistics) is ignored: images are generated at the model's own size.

`load_prompt_file` also reads a `.txt` list: one prompt per line, blank lines and lines starting
with `#` skipped.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_COLUMNS = ("prompt", "adv_prompt", "sensitive prompt", "target_prompt", "text")
SEED_COLUMNS = ("evaluation_seed", "seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
CATEGORY_COLUMNS = ("categories", "category", "label", "concept")
CASE_COLUMNS = ("case_number",)
# Columns only I2P-derived files carry; used to name the format in reports.
I2P_MARKERS = ("inappropriate_percentage", "nudity_percentage", "sd_image_width", "lexica_url")


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or lacks a needed column; the message names the file."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int | None = None  # the file's evaluation seed, if it has one
    guidance: float | None = None  # the file's guidance scale, if it has one
    categories: tuple[str, ...] = ()
    case_number: str | None = None  # the file's row identifier, if it has one


@dataclass(frozen=True)
class PromptFile:
    """What was read: the rows, the columns each field came from, and a name for the layout."""

    path: str
    rows: list[PromptRow]
    columns: dict[str, str | None] = field(default_factory=dict)  # field -> column name in the file
    format: str = "generic"


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def _find(header: list[str], candidates: tuple[str, ...]) -> str | None:
    keys = {_key(h): h for h in reversed(header)}  # the first of duplicated names wins
    for candidate in candidates:
        if _key(candidate) in keys:
            return keys[_key(candidate)]
    return None


def _format_name(header: list[str], prompt_column: str) -> str:
    keys = {_key(h) for h in header}
    if _key(prompt_column) in (_key("adv_prompt"), _key("target_prompt")):
        return "mma-diffusion"
    if _key(prompt_column) == _key("sensitive prompt"):
        return "ring-a-bell"
    if any(_key(m) in keys for m in I2P_MARKERS):
        return "i2p"
    if keys == {"prompt", "case number", "evaluation seed"}:
        return "ring-a-bell"
    if _key("case_number") in keys and _key("evaluation_seed") in keys:
        return "unlearndiffatk"
    return "generic"


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if not path.is_file():
        raise PromptFileError(f"{path}: not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path} is not UTF-8 text ({err})") from None


def _parse_seed(value: str, path: Path, line: int, column: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise PromptFileError(f"{path}: line {line}: column {column!r}: {value!r} is not an integer seed")
    return int(value) if value.lstrip("+-").isdigit() else int(number)  # exact for big integer text


def _parse_guidance(value: str, path: Path, line: int, column: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise PromptFileError(f"{path}: line {line}: column {column!r}: {value!r} is not a guidance scale")
    return number


def _split_categories(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _select(rows: list[PromptRow], path: Path, category: str | None, category_column: str | None, limit: int | None):
    if category is not None:
        if category_column is None:
            raise PromptFileError(
                f"{path}: a category ({category!r}) was asked for but the file has no category column "
                f"(one of {', '.join(CATEGORY_COLUMNS)})"
            )
        wanted = category.strip().casefold()
        rows = [r for r in rows if any(c.casefold() == wanted for c in r.categories)]
        if not rows:
            raise PromptFileError(f"{path}: no row has the category {category!r} (column {category_column!r})")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


def _prompt_column(header: list[str], wanted: str | None, path: Path) -> str:
    """The header's prompt column: ``wanted`` (matched as the other columns are), else a known name."""
    shown = ", ".join(repr(h) for h in header)
    if wanted is not None:
        found = _find(header, (wanted,))
        if found is None:
            raise PromptFileError(f"{path}: prompt column {wanted!r} not found; the header has {shown}")
        return found
    found = _find(header, PROMPT_COLUMNS)
    if found is None:
        raise PromptFileError(
            f"{path}: no prompt column; the header has {shown}, expected one of "
            f"{', '.join(repr(c) for c in PROMPT_COLUMNS)} (or name it with --prompt-column)"
        )
    return found


def read_prompt_csv(
    path: str | os.PathLike, prompt_column: str | None = None, limit: int | None = None, category: str | None = None
) -> PromptFile:
    """Read a prompt CSV (see the module docstring) into a PromptFile.

    category keeps the rows whose categories include it (case-insensitive); limit keeps the first
    `limit` rows after that.
    """
    path = Path(os.fspath(path))
    text = _read_text(path)
    try:
        records = [(n, row) for n, row in _csv_rows(text)]
    except csv.Error as err:
        raise PromptFileError(f"{path}: invalid CSV: {err}") from None
    records = [(n, row) for n, row in records if any(cell.strip() for cell in row)]
    if not records:
        raise PromptFileError(f"{path}: the file is empty: expected a header row and prompts")
    header = [cell.strip() for cell in records[0][1]]
    prompt_column = _prompt_column(header, prompt_column, path)
    columns = {
        "prompt": prompt_column,
        "seed": _find(header, SEED_COLUMNS),
        "guidance": _find(header, GUIDANCE_COLUMNS),
        "categories": _find(header, CATEGORY_COLUMNS),
        "case_number": _find(header, CASE_COLUMNS),
    }
    index = {name: header.index(col) for name, col in columns.items() if col is not None}

    rows = []
    for line, cells in records[1:]:
        if len(cells) > len(header):
            raise PromptFileError(f"{path}: line {line}: {len(cells)} cells but the header has {len(header)} columns")
        cells = cells + [""] * (len(header) - len(cells))
        prompt = cells[index["prompt"]].strip()
        if not prompt:
            raise PromptFileError(f"{path}: line {line}: column {prompt_column!r} is empty")
        rows.append(
            PromptRow(
                prompt=prompt,
                seed=_parse_seed(cells[index["seed"]], path, line, columns["seed"]) if "seed" in index else None,
                guidance=(
                    _parse_guidance(cells[index["guidance"]], path, line, columns["guidance"])
                    if "guidance" in index
                    else None
                ),
                categories=_split_categories(cells[index["categories"]]) if "categories" in index else (),
                case_number=(cells[index["case_number"]].strip() or None) if "case_number" in index else None,
            )
        )
    if not rows:
        raise PromptFileError(f"{path}: the file has a header row only: no prompts")
    rows = _select(rows, path, category, columns["categories"], limit)
    return PromptFile(str(path), rows, columns, _format_name(header, prompt_column))


def _csv_rows(text: str):
    """(line number where the record starts, cells) per CSV record; quoted cells may span lines."""
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    start = 1
    for row in reader:
        yield start, row
        start = reader.line_num + 1


def load_prompt_csv(
    path: str | os.PathLike, prompt_column: str | None = None, limit: int | None = None, category: str | None = None
) -> list[PromptRow]:
    """The rows of a prompt CSV, its layout detected from the header (see the module docstring)."""
    return read_prompt_csv(path, prompt_column=prompt_column, limit=limit, category=category).rows


def read_prompt_txt(path: str | os.PathLike, limit: int | None = None) -> PromptFile:
    path = Path(os.fspath(path))
    lines = [line.strip() for line in _read_text(path).splitlines()]
    rows = [PromptRow(line) for line in lines if line and not line.startswith("#")]
    if not rows:
        raise PromptFileError(f"{path}: no prompts: every line is blank or a comment")
    return PromptFile(str(path), _select(rows, path, None, None, limit), {"prompt": None}, "text")


def read_prompt_file(
    path: str | os.PathLike, prompt_column: str | None = None, limit: int | None = None, category: str | None = None
) -> PromptFile:
    """A `.csv` (any layout above) or a `.txt` list (one prompt per line), chosen by suffix."""
    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if prompt_column is not None or category is not None:
            raise PromptFileError(
                f"{path}: a .txt prompt list has no columns: a prompt column or category cannot be chosen"
            )
        return read_prompt_txt(path, limit=limit)
    if suffix == ".csv":
        return read_prompt_csv(path, prompt_column=prompt_column, limit=limit, category=category)
    raise PromptFileError(f"{path}: unsupported prompt file type {path.suffix!r}; use a .csv or a .txt file")


def load_prompt_file(
    path: str | os.PathLike, prompt_column: str | None = None, limit: int | None = None, category: str | None = None
) -> list[PromptRow]:
    return read_prompt_file(path, prompt_column=prompt_column, limit=limit, category=category).rows
