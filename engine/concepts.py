"""Concept files: what to erase from a model, what each concept becomes, and what to keep.

Every concept to erase has

* a **name**, e.g. ``Brad Pitt``;
* **templates**, prompts with exactly one ``{}`` where the name goes, e.g. ``a photo of {}``
  (default: just ``{}``). A literal brace is written ``{{`` or ``}}``;
* an **anchor**, what the concept should become: ``a person``, ``art``, a safe rewrite such as
  ``a person wearing clothes``, or empty (the default) for the unconditional prompt. Each
  template filled with the name is mapped onto the same template filled with the anchor;
* a **weight**, a positive number (default 1) scaling how strongly it is erased.

What to keep: other concepts (names, expanded with the default templates) and captions.

Four file forms, chosen by suffix (case-insensitive). Text is read as UTF-8.

``.yaml`` / ``.yml`` / ``.json``: a mapping with the keys ``defaults``, ``concepts``, ``preserve``
(only ``concepts`` is required)::

    defaults: {anchor: "a person", templates: ["a photo of {}", "a portrait of {}"], weight: 1}
    concepts:
      - Brad Pitt                      # a bare name takes the defaults
      - {name: Van Gogh, anchor: art, templates: ["a painting by {}", "{} style"]}
      - {name: Angelina Jolie, prompts: ["Angelina Jolie on a red carpet"], weight: 2}
    preserve: {concepts: [Tom Hanks], captions: captions.txt}

  ``defaults`` keys: ``anchor``, ``templates``, ``weight``. A concept is a bare name or a mapping
  with the keys ``name`` (required), ``anchor``, ``templates``, ``weight``, ``tokens`` (which
  token positions carry its closed-form edit: ``last``, ``eot``, ``concept`` or ``all``; default: the
  method's) and ``prompts``:
  literal prompts that contain the name exactly once (case-sensitive); each is turned into a
  template (the name replaced by ``{}``, any braces kept literally) and added to the concept's
  templates, its own or the defaults. ``preserve`` keys: ``concepts``, a list of names (they use the default templates),
  and ``captions``, a list of captions or the path of a text file with one caption per line
  (blank lines skipped), relative to the concept file's folder. A file that is just a list is
  read as the ``concepts`` list.

``.txt``: one name per line; blank lines and lines starting with ``#`` are skipped. Every
  concept takes the command line's ``--anchor`` and ``--template`` (or the built-in defaults)::

      # erasure erase --concepts celebrities.txt --anchor "a person" ...
      Brad Pitt
      Angelina Jolie

``.csv``: a header row with a ``name`` column and optionally ``anchor``, ``weight`` and
  ``templates`` (several separated by ``|``); an empty cell means "not set". A single column
  without such a header is read as one name per row::

      name,anchor,templates
      Brad Pitt,a person,a photo of {}|a portrait of {}
      Van Gogh,art,a painting by {}

Precedence for anchor and templates: the concept's own value, then the command line
(``--anchor``, ``--template``; ``anchor=``/``templates=`` in Python), then the file's
``defaults``, then the built-in defaults (empty anchor, template ``{}``).

Rules, each reported with the file, the entry and the field: names are non-empty and unique
(compared case-insensitively, whitespace collapsed); a concept may not equal its anchor nor
also be preserved; weights are positive finite numbers; unknown keys are errors.
"""

from __future__ import annotations

import csv
import json
import math
import os
import reprlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

import yaml

DEFAULT_TEMPLATES = ("{}",)

FILE_KEYS = ("defaults", "concepts", "preserve")
DEFAULTS_KEYS = ("anchor", "templates", "weight")
ENTRY_KEYS = ("name", "anchor", "templates", "prompts", "weight", "tokens")
# Which token positions carry a concept's edit in the closed-form methods (engine.closed_form).
TOKEN_MODES = ("last", "eot", "concept", "all")
PRESERVE_KEYS = ("concepts", "captions")
PRESERVE_ENTRY_KEYS = ("name", "templates")  # what to_dict writes when preserved templates differ
CSV_COLUMNS = ("name", "anchor", "weight", "templates")
SUFFIXES = (".yaml", ".yml", ".json", ".txt", ".csv")


class ConceptFileError(ValueError):
    """A concept file (or in-memory concept set) is invalid; the message says where and why."""

    def __init__(self, source: str, entry: str | None, field: str | None, problem: str):
        self.source, self.entry, self.field, self.problem = source, entry, field, problem
        where = [str(source)] + ([entry] if entry else []) + ([f"field {field!r}"] if field else [])
        super().__init__(": ".join(where) + ": " + problem)


def _norm(text: str) -> str:
    """Comparison key for names: case-insensitive, whitespace collapsed."""
    return " ".join(text.split()).casefold()


# What a concept file may be and expand to. A few hundred bytes of YAML aliases can stand for
# billions of nodes (an "alias bomb"); the largest real concept sets are far below both bounds.
MAX_FILE_BYTES = 32 << 20
MAX_NODES = 1_000_000
SHOW_CHARS = 200

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOW_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def _show(value) -> str:
    """A value for an error message, cut short: a nested value can be huge (see MAX_NODES)."""
    return f"{type(value).__name__} {_REPR.repr(value)}"


def _node_count(node, source: str) -> int:
    """How many nodes a YAML node graph stands for once every alias is expanded, stopping as
    soon as that passes MAX_NODES. Linear in the graph (shared nodes are counted once each)."""
    sizes: dict[int, int] = {}
    pending: set[int] = set()

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in pending:
            raise ConceptFileError(source, None, None, "a YAML alias refers to a node that contains it (a recursive "
                                   "structure); concept files must be plain trees")
        pending.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [part for pair in n.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise ConceptFileError(source, None, None, f"the YAML expands to more than {MAX_NODES:,} values "
                                       "(through aliases: '*name'); write the concepts out instead")
        pending.discard(key)
        sizes[key] = total
        return total

    return size(node)


def load_yaml(text: str, source: str):
    """yaml.safe_load with a bound on what the document may expand to (MAX_NODES)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _node_count(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _template_problem(template) -> str | None:
    if not isinstance(template, str):
        return f"templates must be strings, got {_show(template)}"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in Formatter().parse(template) if f is not None]
    except ValueError as err:
        return f"template {template!r} is not a valid format string ({err}); write a literal brace as {{{{ or }}}}"
    others = [f for f in fields if f != ("", "", None)]
    if others:
        f, spec, conv = others[0]
        text = "{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        return (
            f"template {template!r} has the format field {text}; only a bare {{}} is allowed "
            "(write a literal brace as {{ or }})"
        )
    if not fields:
        return f"template {template!r} has no {{}} where the name goes"
    if len(fields) > 1:
        return f"template {template!r} has {len(fields)} {{}} placeholders; exactly one is allowed"
    return None


def _templates_problem(templates) -> str | None:
    if not isinstance(templates, (list, tuple)):
        return f"must be a list of templates, got {_show(templates)}"
    if not templates:
        return "no templates: give at least one, e.g. 'a photo of {}'"
    for template in templates:
        problem = _template_problem(template)
        if problem:
            return problem
    return None


def _weight_problem(weight) -> str | None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"must be a positive finite number, got {_show(weight)}"
    return None


@dataclass(frozen=True)
class Concept:
    """One concept to erase (or to preserve). Name and anchor are stripped of surrounding spaces."""

    name: str
    anchor: str = ""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    weight: float = 1.0
    tokens: str | None = None  # last | eot | concept | all; None: the method's setting

    def __post_init__(self):
        def fail(field, problem):
            raise ConceptFileError("<memory>", f"concept {self.name!r}", field, problem)

        if not isinstance(self.name, str) or not self.name.strip():
            fail("name", f"must be a non-empty string, got {_show(self.name)}")
        if not isinstance(self.anchor, str):
            fail("anchor", f"must be a string ('' for the unconditional prompt), got {_show(self.anchor)}")
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "anchor", self.anchor.strip())
        if _norm(self.name) == _norm(self.anchor):
            fail("anchor", f"the anchor {self.anchor!r} is the concept itself; choose what it should become instead")
        problem = _templates_problem(self.templates)
        if problem:
            fail("templates", problem)
        object.__setattr__(self, "templates", tuple(self.templates))
        problem = _weight_problem(self.weight)
        if problem:
            fail("weight", problem)
        object.__setattr__(self, "weight", float(self.weight))
        if self.tokens is not None and self.tokens not in TOKEN_MODES:
            fail("tokens", f"must be one of {', '.join(TOKEN_MODES)}, got {_show(self.tokens)}")

    def prompt_pairs(self) -> list[tuple[str, str, str]]:
        """(template, source_prompt, target_prompt) per template: the template filled with name and anchor."""
        return [(t, t.format(self.name), t.format(self.anchor)) for t in self.templates]


def _check_unique(concepts: list, preserve: list, source: str) -> None:
    """concepts/preserve: [(entry label, Concept)]. Names unique; nothing both erased and preserved."""
    erased: dict[str, str] = {}
    for label, concept in concepts:
        key = _norm(concept.name)
        if key in erased:
            raise ConceptFileError(source, label, "name", f"duplicate of {erased[key]} (names are compared case-insensitively)")
        erased[key] = label
    kept: dict[str, str] = {}
    for label, concept in preserve:
        key = _norm(concept.name)
        if key in erased:
            problem = f"{concept.name!r} is also a concept to erase ({erased[key]}); it cannot be both erased and preserved"
            raise ConceptFileError(source, label, "name", problem)
        if key in kept:
            raise ConceptFileError(source, label, "name", f"duplicate of {kept[key]} (names are compared case-insensitively)")
        kept[key] = label


def _warn_contradictions(concept_set) -> None:
    """Warn when a caption to preserve is also a prompt to erase: the edit is then asked to both
    keep and change the same prompt, and does neither fully."""
    erased = {}
    for c in concept_set.concepts:
        for _, src, _ in c.prompt_pairs():
            erased.setdefault(_norm(src), c.name)
    clashes = [(i, cap) for i, cap in enumerate(concept_set.preserve_captions) if _norm(cap) in erased]
    if clashes:
        i, caption = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        warnings.warn(f"{concept_set.source}: preserve.captions[{i}] {caption!r}{more} is also a prompt of the erased "
                      f"concept {erased[_norm(caption)]!r}: it is asked to be both erased and kept; remove it from "
                      "the captions", UserWarning, stacklevel=4)


@dataclass(frozen=True)
class ConceptSet:
    """The concepts to erase, the concepts and captions to preserve, and where they came from."""

    concepts: tuple[Concept, ...]
    preserve_concepts: tuple[Concept, ...] = ()  # anchor and weight unused
    preserve_captions: tuple[str, ...] = ()
    source: str = "<memory>"  # file path or description, for messages

    def __post_init__(self):
        for attr in ("concepts", "preserve_concepts", "preserve_captions"):
            value = getattr(self, attr)
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, attr, value)
            if not isinstance(value, tuple):
                raise ConceptFileError(self.source, None, attr, f"must be a tuple, got {_show(value)}")
        if not self.concepts:
            raise ConceptFileError(self.source, None, "concepts", "the concept list is empty: nothing to erase")
        for attr in ("concepts", "preserve_concepts"):
            for i, concept in enumerate(getattr(self, attr)):
                if not isinstance(concept, Concept):
                    raise ConceptFileError(self.source, f"{attr}[{i}]", None, f"must be a Concept, got {_show(concept)}")
        for i, caption in enumerate(self.preserve_captions):
            if not isinstance(caption, str) or not caption.strip():
                problem = f"must be a non-empty string, got {_show(caption)}"
                raise ConceptFileError(self.source, f"preserve_captions[{i}]", None, problem)
        _check_unique(
            [(f"concepts[{i}] ({c.name!r})", c) for i, c in enumerate(self.concepts)],
            [(f"preserve_concepts[{i}] ({c.name!r})", c) for i, c in enumerate(self.preserve_concepts)],
            self.source,
        )
        _warn_contradictions(self)

    def names(self) -> list[str]:
        """Names of the concepts to erase, in order."""
        return [c.name for c in self.concepts]

    def locate(self, prompt: str) -> tuple[str, str | None]:
        """(entry, field) of the set that makes ``prompt``: for an error about that prompt."""
        for i, c in enumerate(self.concepts):
            for template, src, tgt in c.prompt_pairs():
                if prompt in (src, tgt):
                    field = "templates" if prompt == src else "anchor"
                    return f"concepts[{i}] ({c.name!r}), template {template!r}", field
        for i, c in enumerate(self.preserve_concepts):
            for template, src, _ in c.prompt_pairs():
                if prompt == src:
                    return f"preserve.concepts[{i}] ({c.name!r}), template {template!r}", None
        for i, caption in enumerate(self.preserve_captions):
            if prompt == caption:
                return f"preserve.captions[{i}]", None
        return "a prompt", None

    def to_dict(self) -> dict:
        """A JSON-able dict in the YAML/JSON file form (captions inline); from_dict reads it back."""
        out = {
            "concepts": [
                {"name": c.name, "anchor": c.anchor, "templates": list(c.templates), "weight": c.weight}
                | ({"tokens": c.tokens} if c.tokens else {})
                for c in self.concepts
            ]
        }
        preserve = {}
        if self.preserve_concepts:
            shared = {c.templates for c in self.preserve_concepts}
            if len(shared) == 1:
                out = {"defaults": {"templates": list(shared.pop())}, **out}
                preserve["concepts"] = [c.name for c in self.preserve_concepts]
            else:
                preserve["concepts"] = [{"name": c.name, "templates": list(c.templates)} for c in self.preserve_concepts]
        if self.preserve_captions:
            preserve["captions"] = list(self.preserve_captions)
        if preserve:
            out["preserve"] = preserve
        return out

    @classmethod
    def from_dict(cls, data, *, source="<memory>", base_dir=None, anchor=None, templates=None) -> ConceptSet:
        """Read the YAML/JSON form (a mapping or a bare list of concepts). A captions path is
        relative to `base_dir` (default: the current folder). `anchor`/`templates` override the
        file's defaults for concepts that set none."""
        source = str(source)
        if isinstance(data, list):
            data = {"concepts": data}
        if not isinstance(data, dict):
            problem = f"expected a mapping with the keys {', '.join(FILE_KEYS)} or a list of concepts, got {_show(data)}"
            raise ConceptFileError(source, None, None, problem)
        _check_keys(data, FILE_KEYS, source, "top level")

        defaults = {} if data.get("defaults") is None else data["defaults"]
        if not isinstance(defaults, dict):
            raise ConceptFileError(source, "defaults", None, f"must be a mapping, got {_show(defaults)}")
        _check_keys(defaults, DEFAULTS_KEYS, source, "defaults")
        d_anchor = defaults.get("anchor", "")
        d_templates = defaults.get("templates", DEFAULT_TEMPLATES)
        d_anchor, d_templates, d_weight = _check_defaults(d_anchor, d_templates, defaults.get("weight", 1.0), source, "defaults")
        if anchor is not None or templates is not None:  # the command line beats the file's defaults
            d_anchor = d_anchor if anchor is None else anchor
            d_templates = d_templates if templates is None else templates
            d_anchor, d_templates, _ = _check_defaults(d_anchor, d_templates, 1.0, source, "--anchor/--template arguments")

        concepts = data.get("concepts")
        if "concepts" not in data:
            raise ConceptFileError(source, None, "concepts", "missing: the file must list the concepts to erase")
        if concepts is not None and not isinstance(concepts, list):
            raise ConceptFileError(source, None, "concepts", f"must be a list of concepts, got {_show(concepts)}")
        if not concepts:
            raise ConceptFileError(source, None, "concepts", "the concept list is empty: nothing to erase")
        entries = [(f"concepts[{i}]", entry) for i, entry in enumerate(concepts)]

        preserve = {} if data.get("preserve") is None else data["preserve"]
        if not isinstance(preserve, dict):
            raise ConceptFileError(source, "preserve", None, f"must be a mapping, got {_show(preserve)}")
        _check_keys(preserve, PRESERVE_KEYS, source, "preserve")
        kept = [] if preserve.get("concepts") is None else preserve["concepts"]
        if not isinstance(kept, list):
            raise ConceptFileError(source, "preserve", "concepts", f"must be a list of names, got {_show(kept)}")
        kept = [(f"preserve.concepts[{i}]", name) for i, name in enumerate(kept)]
        captions = _captions(preserve.get("captions"), source, Path(base_dir) if base_dir is not None else Path.cwd())
        return _make_set(source, entries, d_anchor, d_templates, d_weight, kept, captions)


def _check_keys(mapping: dict, allowed: tuple, source: str, entry: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConceptFileError(source, entry, str(key), f"unknown key; allowed keys: {', '.join(allowed)}")


def _check_defaults(anchor, templates, weight, source: str, entry: str):
    if not isinstance(anchor, str):
        problem = f"must be a string ('' for the unconditional prompt), got {_show(anchor)}"
        raise ConceptFileError(source, entry, "anchor", problem)
    problem = _templates_problem(templates)
    if problem:
        raise ConceptFileError(source, entry, "templates", problem)
    problem = _weight_problem(weight)
    if problem:
        raise ConceptFileError(source, entry, "weight", problem)
    return anchor.strip(), tuple(templates), weight


def _prompt_template(prompt, name: str) -> str:
    """'Brad Pitt on a {red} carpet' -> '{} on a {{red}} carpet'; raises ValueError if unusable."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompts must be strings, got {_show(prompt)}")
    count = prompt.count(name)
    if count != 1:
        found = "does not contain" if count == 0 else f"contains {count} times"
        raise ValueError(f"prompt {prompt!r} {found} the name {name!r}; it must appear exactly once (case-sensitive)")
    before, after = prompt.split(name)
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(before) + "{}" + escape(after)


def _entry_concept(entry, label: str, source: str, anchor: str, templates: tuple, weight: float) -> tuple[str, Concept]:
    """One concepts[] entry (a name or a mapping) -> (label naming it, Concept)."""
    if not isinstance(entry, (dict, list)):  # a bare name (or a number, reported as a bad name)
        entry = {"name": entry}
    if not isinstance(entry, dict):
        problem = f"expected a name or a mapping with the keys {', '.join(ENTRY_KEYS)}, got {_show(entry)}"
        raise ConceptFileError(source, label, None, problem)
    name = entry.get("name")
    if isinstance(name, str) and name.strip():
        name = name.strip()
        label = f"{label} ({name!r})"
    _check_keys(entry, ENTRY_KEYS, source, label)
    if "name" not in entry:
        raise ConceptFileError(source, label, "name", "missing; every concept needs a name")
    if not isinstance(name, str) or not name:
        hint = "" if isinstance(name, str) else " (quote it in YAML)"
        raise ConceptFileError(source, label, "name", f"must be a non-empty string, got {_show(entry['name'])}{hint}")
    own = entry.get("templates", templates)
    if "templates" in entry:  # checked here, before prompts add to it; [] is fine with prompts
        if not isinstance(own, list):
            raise ConceptFileError(source, label, "templates", f"must be a list of templates, got {_show(own)}")
        for template in own:
            if _template_problem(template):
                raise ConceptFileError(source, label, "templates", _template_problem(template))
    prompts = entry.get("prompts", [])
    if not isinstance(prompts, list):
        raise ConceptFileError(source, label, "prompts", f"must be a list of prompts, got {_show(prompts)}")
    try:
        extra = [_prompt_template(p, name) for p in prompts]
    except ValueError as err:
        raise ConceptFileError(source, label, "prompts", str(err)) from None
    try:
        concept = Concept(
            name,
            anchor=entry.get("anchor", anchor),
            templates=tuple(dict.fromkeys([*own, *extra])),
            weight=entry.get("weight", weight),
            tokens=entry.get("tokens"),
        )
    except ConceptFileError as err:
        raise ConceptFileError(source, label, err.field, err.problem) from None
    return label, concept


def _make_set(source, entries: list, anchor: str, templates: tuple, weight: float, kept: list, captions: tuple) -> ConceptSet:
    """Build and check the set. entries/kept: [(label, raw entry)]; kept entries are names (or {name, templates})."""
    concepts = [_entry_concept(entry, label, source, anchor, templates, weight) for label, entry in entries]
    preserve = []
    for label, entry in kept:
        if isinstance(entry, dict):
            _check_keys(entry, PRESERVE_ENTRY_KEYS, source, label)
        elif not isinstance(entry, str):
            raise ConceptFileError(source, label, None, f"expected a name, got {_show(entry)}")
        label, concept = _entry_concept(entry, label, source, "", templates, 1.0)
        preserve.append((label, concept))
    _check_unique(concepts, preserve, source)
    return ConceptSet(tuple(c for _, c in concepts), tuple(c for _, c in preserve), captions, source)


def _captions(value, source: str, base_dir: Path) -> tuple[str, ...]:
    """preserve.captions: a list of captions, or a text file path (one per line) relative to base_dir."""
    if value is None:
        return ()
    if isinstance(value, str):
        path = base_dir / value
        if not path.is_file():
            raise ConceptFileError(source, "preserve", "captions", f"captions file not found: {path}")
        lines = [line.strip() for line in _read_text(path, source).splitlines()]
        captions = tuple(line for line in lines if line)
        if not captions:
            raise ConceptFileError(source, "preserve", "captions", f"captions file {path} is empty")
        return captions
    if not isinstance(value, list):
        raise ConceptFileError(source, "preserve", "captions", f"must be a list of captions or a file path, got {_show(value)}")
    for i, caption in enumerate(value):
        if not isinstance(caption, str) or not caption.strip():
            raise ConceptFileError(source, f"preserve.captions[{i}]", None, f"must be a non-empty string, got {_show(caption)}")
    return tuple(c.strip() for c in value)


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConceptFileError(source, None, None, f"{path} is not UTF-8 text ({err})") from None


def _load_txt(text: str, source: str, anchor: str, templates: tuple) -> ConceptSet:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append((f"line {number}", line))
    if not entries:
        raise ConceptFileError(source, None, None, "the concept list is empty: every line is blank or a comment")
    return _make_set(source, entries, anchor, templates, 1.0, [], ())


def _load_csv(text: str, source: str, anchor: str, templates: tuple) -> ConceptSet:
    try:
        reader = csv.reader(text.splitlines(keepends=True), skipinitialspace=True, strict=True)
        rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader]
    except csv.Error as err:
        raise ConceptFileError(source, f"line {reader.line_num}", None, f"invalid CSV: {err}") from None
    rows = [(n, row) for n, row in rows if any(row)]
    if not rows:
        raise ConceptFileError(source, None, None, "the concept list is empty: the file has no rows")
    header = [cell.lower() for cell in rows[0][1]]
    entries = []
    if "name" not in header:  # no header: one name per row
        for number, row in rows:
            cells = [cell for cell in row if cell]
            if len(cells) > 1:
                raise ConceptFileError(
                    source, f"line {number}", "name",
                    f"{len(cells)} cells but a CSV without a header row holds one name per row; quote names that contain "
                    f"commas, or start with a header row with a 'name' column (allowed columns: {', '.join(CSV_COLUMNS)})",
                )
            entries.append((f"line {number}", cells[0]))
        return _make_set(source, entries, anchor, templates, 1.0, [], ())
    for column in header:
        if column not in CSV_COLUMNS:
            problem = f"unknown column; allowed columns: {', '.join(CSV_COLUMNS)}"
            raise ConceptFileError(source, f"line {rows[0][0]} (header)", column, problem)
    for number, row in rows[1:]:
        label = f"line {number}"
        if len(row) > len(header):
            raise ConceptFileError(source, label, None, f"{len(row)} cells but the header has {len(header)} columns")
        cells = dict(zip(header, row))
        entry = {"name": cells.get("name", "")}
        if cells.get("anchor"):
            entry["anchor"] = cells["anchor"]
        if cells.get("templates"):
            entry["templates"] = [t.strip() for t in cells["templates"].split("|") if t.strip()]
        if cells.get("weight"):
            try:
                entry["weight"] = float(cells["weight"])
            except ValueError:
                name = f" ({entry['name']!r})" if entry["name"] else ""
                problem = f"must be a positive finite number, got {cells['weight']!r}"
                raise ConceptFileError(source, label + name, "weight", problem) from None
        entries.append((label, entry))
    if not entries:
        raise ConceptFileError(source, None, None, "the concept list is empty: the file has a header row only")
    return _make_set(source, entries, anchor, templates, 1.0, [], ())


def load_concepts(path, *, anchor: str | None = None, templates: list[str] | None = None) -> ConceptSet:
    """Read a concept file (.yaml/.yml/.json/.txt/.csv, see the module docstring).

    anchor/templates (the command line's --anchor/--template) apply to every concept that does
    not set its own, and take precedence over the file's defaults.
    """
    path = Path(os.fspath(path))
    source = str(path)
    if not path.is_file():
        raise ConceptFileError(source, None, None, "concept file not found" if not path.exists() else "not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        problem = f"unsupported concept file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}"
        raise ConceptFileError(source, None, None, problem)
    if path.stat().st_size > MAX_FILE_BYTES:
        problem = f"the file is {path.stat().st_size:,} bytes; concept files are limited to {MAX_FILE_BYTES:,}"
        raise ConceptFileError(source, None, None, problem)
    text = _read_text(path, source)
    if not text.strip():
        raise ConceptFileError(source, None, None, "the file is empty: no concepts to erase")
    if suffix in (".txt", ".csv"):
        d_anchor = "" if anchor is None else anchor
        d_templates = DEFAULT_TEMPLATES if templates is None else templates
        d_anchor, d_templates, _ = _check_defaults(d_anchor, d_templates, 1.0, source, "--anchor/--template arguments")
        load = _load_txt if suffix == ".txt" else _load_csv
        return load(text, source, d_anchor, d_templates)
    try:
        data = json.loads(text) if suffix == ".json" else load_yaml(text, source)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConceptFileError(source, None, None, f"invalid {'JSON' if suffix == '.json' else 'YAML'}: {err}") from None
    if data is None:
        raise ConceptFileError(source, None, None, "the file is empty (only comments): no concepts to erase")
    return ConceptSet.from_dict(data, source=source, base_dir=path.parent, anchor=anchor, templates=templates)


def concepts_from_names(names, *, anchor="", templates=None, preserve=(), captions=()) -> ConceptSet:
    """A ConceptSet from a list of names sharing one anchor and template list.

    preserve: names to keep (same templates); captions: a list, or a text file path.
    """
    if isinstance(names, str):
        names = [names]
    if isinstance(preserve, str):
        preserve = [preserve]
    data = {
        "concepts": list(names),
        "preserve": {"concepts": list(preserve), "captions": captions if isinstance(captions, str) else list(captions)},
    }
    return ConceptSet.from_dict(data, source="<names>", anchor=anchor, templates=templates)
