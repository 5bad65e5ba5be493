"""Concept files: the YAML/JSON/TXT/CSV forms, defaults and overrides, and every validation error."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from engine.concepts import (
    DEFAULT_TEMPLATES,
    Concept,
    ConceptFileError,
    ConceptSet,
    concepts_from_names,
    load_concepts,
)

DATA = Path(__file__).parent / "data" / "concepts"
FIRST = ["Arlen", "Bexley", "Brisa", "Calder", "Dorian", "Elspeth", "Fenwick", "Galen", "Hollis", "Isolde", "Jory", "Kestrel"]
LAST = ["Corrance", "Holloway", "Greywell", "Dunmore", "Vantorre", "Oakhurst", "Stormont", "Thistlewood", "Ravenscroft", "Pendleton"]
NAMES_120 = [f"{first} {last}" for first in FIRST for last in LAST]


def where(*parts: str) -> str:
    """A regex matching the message parts in order (file, entry, field, problem)."""
    return "(?s)" + ".*".join(re.escape(p) for p in parts)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the forms


def test_yaml_example_with_captions_next_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the captions path is relative to the concept file, not the cwd
    cs = load_concepts(DATA / "celebrities.yaml")
    assert cs.source == str(DATA / "celebrities.yaml")
    assert cs.names() == ["Arlen Corrance", "Van Gogh", "Bexley Holloway"]
    arlen, gogh, bexley = cs.concepts
    assert arlen == Concept("Arlen Corrance", "a person", ("a photo of {}", "a portrait of {}"), 1.0)
    assert gogh == Concept("Van Gogh", "art", ("a painting by {}", "{} style"), 1.0)
    # prompts become templates, added to the defaults
    assert bexley.templates == ("a photo of {}", "a portrait of {}", "{} on a red carpet")
    assert bexley.anchor == "a person" and bexley.weight == 2.0 and isinstance(bexley.weight, float)
    # preserved concepts take the default templates
    assert cs.preserve_concepts == (Concept("Calder Dunmore", "", ("a photo of {}", "a portrait of {}")),)
    # one caption per line, blank lines skipped, whitespace stripped
    assert cs.preserve_captions == (
        "a dog running on the beach",
        "a bowl of fruit on a wooden table",
        "a city street at night with cars",
    )


def test_txt_list_of_120_names_takes_the_anchor_keyword(tmp_path):
    lines = ["# 120 made-up identities", ""] + [f"  {n}  " for n in NAMES_120[:60]] + ["", "# more"] + NAMES_120[60:]
    path = write(tmp_path, "identities.txt", "\n".join(lines) + "\n")
    cs = load_concepts(path, anchor="a person")
    assert cs.names() == NAMES_120
    assert all(c.anchor == "a person" and c.templates == DEFAULT_TEMPLATES and c.weight == 1.0 for c in cs.concepts)
    assert cs.preserve_concepts == () and cs.preserve_captions == ()
    assert cs.concepts[0].prompt_pairs() == [("{}", "Arlen Corrance", "a person")]

    cs = load_concepts(path, templates=["a photo of {}", "{} smiling"])
    assert cs.concepts[5].anchor == ""  # no anchor anywhere: unconditional
    assert cs.concepts[5].templates == ("a photo of {}", "{} smiling")


def test_json_form_matches_the_yaml_form(tmp_path):
    (tmp_path / "captions.txt").write_text("a dog running on the beach\n")
    data = {
        "defaults": {"anchor": "a person", "templates": ["a photo of {}"], "weight": 0.5},
        "concepts": ["Arlen Corrance", {"name": "Van Gogh", "anchor": "art", "weight": 3}],
        "preserve": {"concepts": ["Calder Dunmore"], "captions": "captions.txt"},
    }
    from_json = load_concepts(write(tmp_path, "c.json", json.dumps(data)))
    from_yaml = load_concepts(write(tmp_path, "c.YML", yaml.safe_dump(data)))  # suffix is case-insensitive
    assert from_json.concepts == from_yaml.concepts
    assert from_json.concepts == (
        Concept("Arlen Corrance", "a person", ("a photo of {}",), 0.5),
        Concept("Van Gogh", "art", ("a photo of {}",), 3.0),
    )
    assert from_json.preserve_captions == ("a dog running on the beach",)


def test_a_top_level_list_is_the_concept_list(tmp_path):
    cs = load_concepts(write(tmp_path, "c.yaml", "- Arlen Corrance\n- {name: Van Gogh, anchor: art}\n"), anchor="a person")
    assert [(c.name, c.anchor) for c in cs.concepts] == [("Arlen Corrance", "a person"), ("Van Gogh", "art")]
    cs = load_concepts(write(tmp_path, "c.json", '["Arlen Corrance"]'))
    assert cs.names() == ["Arlen Corrance"]


def test_csv_with_header(tmp_path):
    path = write(
        tmp_path,
        "c.csv",
        "\ufeffName, Anchor ,weight,templates\n"  # BOM, header case and spaces are tolerated
        "Arlen Corrance,a man,2,a photo of {}|  a portrait of {} \n"
        "\n"
        '"Corrance, Arlen",,,\n'  # empty cells: not set
        "Van Gogh,art,0.5,\n",
    )
    cs = load_concepts(path, anchor="a person", templates=["{} smiling"])
    assert cs.concepts == (
        Concept("Arlen Corrance", "a man", ("a photo of {}", "a portrait of {}"), 2.0),
        Concept("Corrance, Arlen", "a person", ("{} smiling",), 1.0),
        Concept("Van Gogh", "art", ("{} smiling",), 0.5),
    )


def test_csv_name_column_only(tmp_path):
    cs = load_concepts(write(tmp_path, "c.csv", "name\nArlen Corrance\nVan Gogh\n"), anchor="a person")
    assert cs.names() == ["Arlen Corrance", "Van Gogh"]


def test_csv_without_header_is_one_name_per_row(tmp_path):
    path = write(tmp_path, "c.csv", "Arlen Corrance\n\n  Bexley Holloway \n\"Holloway, Bexley\"\n")
    cs = load_concepts(path, anchor="a person")
    assert cs.names() == ["Arlen Corrance", "Bexley Holloway", "Holloway, Bexley"]
    assert all(c.anchor == "a person" for c in cs.concepts)


def test_concepts_from_names():
    cs = concepts_from_names(["Arlen Corrance", "Van Gogh"], anchor="a person", templates=["a photo of {}"],
                             preserve=["Calder Dunmore"], captions=["a dog on a beach"])
    assert cs.source == "<names>"
    assert cs.concepts == tuple(Concept(n, "a person", ("a photo of {}",)) for n in ["Arlen Corrance", "Van Gogh"])
    assert cs.preserve_concepts == (Concept("Calder Dunmore", "", ("a photo of {}",)),)
    assert cs.preserve_captions == ("a dog on a beach",)
    assert concepts_from_names("Arlen Corrance").concepts == (Concept("Arlen Corrance"),)  # one name, not its letters


def test_captions_file_path_from_dict_is_relative_to_base_dir(tmp_path):
    (tmp_path / "caps.txt").write_text("a cat\n")
    data = {"concepts": ["X Y"], "preserve": {"captions": "caps.txt"}}
    assert ConceptSet.from_dict(data, base_dir=tmp_path).preserve_captions == ("a cat",)


# --------------------------------------------------------------------------- defaults and overrides


@pytest.mark.parametrize(
    "entry, anchor, templates, expected_anchor, expected_templates",
    [
        # nothing set anywhere but the file defaults
        ("A B", None, None, "a person", ("a photo of {}",)),
        # keyword arguments beat the file defaults...
        ("A B", "a man", ["{} smiling"], "a man", ("{} smiling",)),
        ("A B", "", None, "", ("a photo of {}",)),  # '' is an override too: unconditional
        # ...but not the concept's own values
        ({"name": "A B", "anchor": "art", "templates": ["a painting by {}"]}, "a man", ["{} smiling"], "art", ("a painting by {}",)),
        ({"name": "A B", "anchor": ""}, "a man", None, "", ("a photo of {}",)),
        # prompts add to whichever templates apply
        ({"name": "A B", "prompts": ["A B at {home}"]}, None, ["{} smiling"], "a person", ("{} smiling", "{} at {{home}}")),
        ({"name": "A B", "templates": [], "prompts": ["A B at home"]}, None, None, "a person", ("{} at home",)),
    ],
)
def test_override_precedence(entry, anchor, templates, expected_anchor, expected_templates):
    data = {"defaults": {"anchor": "a person", "templates": ["a photo of {}"], "weight": 2}, "concepts": [entry]}
    (concept,) = ConceptSet.from_dict(data, anchor=anchor, templates=templates).concepts
    assert (concept.anchor, concept.templates, concept.weight) == (expected_anchor, expected_templates, 2.0)


def test_templates_keyword_applies_to_preserved_concepts():
    data = {"defaults": {"templates": ["a photo of {}"]}, "concepts": ["A B"], "preserve": {"concepts": ["C D"]}}
    cs = ConceptSet.from_dict(data, templates=["{} smiling"])
    assert cs.preserve_concepts[0].templates == ("{} smiling",)


def test_preserved_concepts_ignore_the_anchor():
    data = {"defaults": {"anchor": "a person"}, "concepts": ["X Y"], "preserve": {"concepts": ["A Person"]}}
    assert ConceptSet.from_dict(data).preserve_concepts == (Concept("A Person"),)


def test_builtin_defaults():
    cs = ConceptSet.from_dict({"concepts": ["A B"]})
    assert cs.concepts == (Concept("A B", "", ("{}",), 1.0),)
    assert cs.source == "<memory>"


# --------------------------------------------------------------------------- prompt pairs, round trip


def test_prompt_pairs():
    c = Concept("Van Gogh", anchor="art", templates=("a painting by {}", "{} style", "{{framed}} {}"))
    assert c.prompt_pairs() == [
        ("a painting by {}", "a painting by Van Gogh", "a painting by art"),
        ("{} style", "Van Gogh style", "art style"),
        ("{{framed}} {}", "{framed} Van Gogh", "{framed} art"),
    ]
    assert Concept("Van Gogh", templates=["a painting by {}"]).prompt_pairs() == [
        ("a painting by {}", "a painting by Van Gogh", "a painting by "),  # '' anchor: the template alone
    ]


def test_prompts_become_templates_that_give_the_prompt_back():
    prompt = "Bexley Holloway at the {gala} }{ tonight"
    (c,) = ConceptSet.from_dict({"concepts": [{"name": "Bexley Holloway", "templates": [], "prompts": [prompt]}]}).concepts
    assert c.templates == ("{} at the {{gala}} }}{{ tonight",)
    assert c.prompt_pairs()[0][1] == prompt


def test_dataclasses_are_frozen_and_normalised():
    c = Concept("  Van Gogh ", anchor=" art ", templates=["{} style"], weight=2)
    assert (c.name, c.anchor, c.templates, c.weight) == ("Van Gogh", "art", ("{} style",), 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "x"
    cs = ConceptSet([c], preserve_captions=["a cat"])
    assert cs.concepts == (c,) and cs.preserve_captions == ("a cat",)
    hash(cs)


def test_round_trip_of_the_yaml_example(tmp_path):
    cs = load_concepts(DATA / "celebrities.yaml")
    data = cs.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-able
    assert ConceptSet.from_dict(json.loads(json.dumps(data)), source=cs.source) == cs
    # the dict is itself a valid concept file
    assert load_concepts(write(tmp_path, "again.json", json.dumps(data))).concepts == cs.concepts
    assert data["concepts"][2] == {
        "name": "Bexley Holloway",
        "anchor": "a person",
        "templates": ["a photo of {}", "a portrait of {}", "{} on a red carpet"],
        "weight": 2.0,
    }


def test_round_trip_with_preserved_concepts_of_different_templates():
    cs = ConceptSet(
        concepts=(Concept("A B", "a person", ("a photo of {}",), 0.25),),
        preserve_concepts=(Concept("C D", templates=("{} smiling",)), Concept("E F", templates=("{}", "a {}"))),
        preserve_captions=("a cat",),
        source="manifest",
    )
    assert ConceptSet.from_dict(cs.to_dict(), source="manifest") == cs
    minimal = ConceptSet((Concept("A B"),))
    assert minimal.to_dict() == {"concepts": [{"name": "A B", "anchor": "", "templates": ["{}"], "weight": 1.0}]}
    assert ConceptSet.from_dict(minimal.to_dict()) == minimal


# --------------------------------------------------------------------------- validation

BAD_YAML = [
    # unknown keys, at every level, listing the allowed ones
    ("concepts: [A B]\ncolour: red\n", ("top level", "field 'colour'", "unknown key", "defaults, concepts, preserve")),
    ("defaults: {anchr: a person}\nconcepts: [A B]\n", ("defaults", "field 'anchr'", "unknown key", "anchor, templates, weight")),
    ("concepts: [{name: A B, prompt: [x]}]\n", ("concepts[0] ('A B')", "field 'prompt'", "unknown key", "name, anchor, templates, prompts, weight")),
    ("concepts: [A B]\npreserve: {names: [C D]}\n", ("preserve", "field 'names'", "unknown key", "concepts, captions")),
    # empty concept list
    ("concepts: []\n", ("field 'concepts'", "empty")),
    ("concepts:\n", ("field 'concepts'", "empty")),
    ("[]\n", ("field 'concepts'", "empty")),
    ("defaults: {anchor: a person}\n", ("field 'concepts'", "missing")),
    ("# nothing but a comment\n", ("empty",)),
    # names
    ("concepts: [A B, '']\n", ("concepts[1]", "field 'name'", "non-empty string")),
    ("concepts: [A B, '   ']\n", ("concepts[1]", "field 'name'", "non-empty string")),
    ("concepts: [1984]\n", ("concepts[0]", "field 'name'", "non-empty string", "int 1984", "quote it")),
    ("concepts: [{name: null}]\n", ("concepts[0]", "field 'name'", "non-empty string")),
    ("concepts: [{anchor: art}]\n", ("concepts[0]", "field 'name'", "missing")),
    ("concepts: [[A B]]\n", ("concepts[0]", "expected a name or a mapping")),
    # a concept that is its own anchor (case and whitespace do not matter)
    ("defaults: {anchor: a person}\nconcepts: [A  PERSON]\n", ("concepts[0] ('A  PERSON')", "field 'anchor'", "is the concept itself")),
    ("concepts: [{name: Art, anchor: art}]\n", ("concepts[0] ('Art')", "field 'anchor'", "is the concept itself")),
    # templates
    ("concepts: [{name: X Y, templates: ['a photo of']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "'a photo of' has no {}")),
    ("concepts: [{name: X Y, templates: ['{} and {}']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "2 {} placeholders")),
    ("concepts: [{name: X Y, templates: ['a photo of {name}']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "format field {name}")),
    ("concepts: [{name: X Y, templates: ['a photo of {0}']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "format field {0}")),
    ("concepts: [{name: X Y, templates: ['{:>9}']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "format field {:>9}")),
    ("concepts: [{name: X Y, templates: ['{} {']}]\n", ("concepts[0] ('X Y')", "field 'templates'", "not a valid format string")),
    ("concepts: [{name: X Y, templates: []}]\n", ("concepts[0] ('X Y')", "field 'templates'", "no templates")),
    ("defaults: {templates: ['a photo']}\nconcepts: [X Y]\n", ("defaults", "field 'templates'", "has no {}")),
    ("defaults: {templates: []}\nconcepts: [X Y]\n", ("defaults", "field 'templates'", "no templates")),
    # prompts
    ("concepts: [{name: X Y, prompts: ['a photo of x y']}]\n", ("concepts[0] ('X Y')", "field 'prompts'", "does not contain the name 'X Y'")),
    ("concepts: [{name: X Y, prompts: ['X Y meets X Y']}]\n", ("concepts[0] ('X Y')", "field 'prompts'", "contains 2 times")),
    ("concepts: [{name: X Y, prompts: 'a photo of X Y'}]\n", ("concepts[0] ('X Y')", "field 'prompts'", "must be a list")),
    ("concepts: [{name: X Y, prompts: [7]}]\n", ("concepts[0] ('X Y')", "field 'prompts'", "must be strings")),
    # weights
    ("concepts: [{name: X Y, weight: 0}]\n", ("concepts[0] ('X Y')", "field 'weight'", "positive finite number")),
    ("concepts: [{name: X Y, weight: -1}]\n", ("concepts[0] ('X Y')", "field 'weight'", "positive finite number")),
    ("concepts: [{name: X Y, weight: .nan}]\n", ("concepts[0] ('X Y')", "field 'weight'", "positive finite number")),
    ("concepts: [{name: X Y, weight: .inf}]\n", ("concepts[0] ('X Y')", "field 'weight'", "positive finite number")),
    ("concepts: [{name: X Y, weight: '2'}]\n", ("concepts[0] ('X Y')", "field 'weight'", "got str '2'")),
    ("concepts: [{name: X Y, weight: true}]\n", ("concepts[0] ('X Y')", "field 'weight'", "got bool")),
    ("defaults: {weight: 0}\nconcepts: [X Y]\n", ("defaults", "field 'weight'", "positive finite number")),
    # wrong types
    ("concepts: [{name: X Y, templates: 'a photo of {}'}]\n", ("concepts[0] ('X Y')", "field 'templates'", "must be a list")),
    ("concepts: [{name: X Y, templates: ['{}', 3]}]\n", ("concepts[0] ('X Y')", "field 'templates'", "must be strings", "int 3")),
    ("concepts: [{name: X Y, anchor: 3}]\n", ("concepts[0] ('X Y')", "field 'anchor'", "must be a string")),
    ("defaults: {anchor: [a person]}\nconcepts: [X Y]\n", ("defaults", "field 'anchor'", "must be a string")),
    ("defaults: [a person]\nconcepts: [X Y]\n", ("defaults", "must be a mapping")),
    ("defaults: []\nconcepts: [X Y]\n", ("defaults", "must be a mapping")),
    ("concepts: [X Y]\npreserve: {concepts: [{name: C D, anchor: a}]}\n", ("preserve.concepts[0]", "field 'anchor'", "unknown key")),
    ("concepts: X Y\n", ("field 'concepts'", "must be a list")),
    ("concepts: [X Y]\npreserve: [C D]\n", ("preserve", "must be a mapping")),
    ("concepts: [X Y]\npreserve: {concepts: C D}\n", ("preserve", "field 'concepts'", "must be a list of names")),
    ("concepts: [X Y]\npreserve: {concepts: [3]}\n", ("preserve.concepts[0]", "expected a name")),
    ("concepts: [X Y]\npreserve: {captions: 3}\n", ("preserve", "field 'captions'", "list of captions or a file path")),
    ("concepts: [X Y]\npreserve: {captions: [a cat, '']}\n", ("preserve.captions[1]", "non-empty string")),
    ("a single name\n", ("expected a mapping", "or a list of concepts")),
    # duplicates and conflicts
    ("concepts: [Van Gogh, X Y, van  GOGH]\n", ("concepts[2] ('van  GOGH')", "field 'name'", "duplicate of concepts[0] ('Van Gogh')")),
    ("concepts: [X Y]\npreserve: {concepts: [C D, x y]}\n", ("preserve.concepts[1] ('x y')", "field 'name'", "also a concept to erase (concepts[0] ('X Y'))")),
    ("concepts: [X Y]\npreserve: {concepts: [C D, c d]}\n", ("preserve.concepts[1] ('c d')", "field 'name'", "duplicate of preserve.concepts[0]")),
    # captions file
    ("concepts: [X Y]\npreserve: {captions: nowhere.txt}\n", ("preserve", "field 'captions'", "captions file not found", "nowhere.txt")),
    ("concepts: [X Y]\npreserve: {captions: blank.txt}\n", ("preserve", "field 'captions'", "blank.txt is empty")),
    # syntax
    ("concepts: [X Y\n", ("invalid YAML", "line 1")),
    ("concepts:\n\t- X Y\n", ("invalid YAML",)),
]


@pytest.mark.parametrize("content, parts", BAD_YAML)
def test_bad_yaml(tmp_path, content, parts):
    (tmp_path / "blank.txt").write_text("\n  \n")
    path = write(tmp_path, "bad.yaml", content)
    with pytest.raises(ConceptFileError, match=where(str(path), *parts)):
        load_concepts(path)


@pytest.mark.parametrize(
    "content, parts",
    [
        ('{"concepts": ["X Y",]}', ("invalid JSON", "line 1 column")),
        ("", ("the file is empty",)),
        ('{"concepts": [{"name": "X Y", "weight": NaN}]}', ("concepts[0] ('X Y')", "field 'weight'", "positive finite")),
        ('{"concepts": ["X Y"], "extra": 1}', ("top level", "field 'extra'", "unknown key")),
    ],
)
def test_bad_json(tmp_path, content, parts):
    path = write(tmp_path, "bad.json", content)
    with pytest.raises(ConceptFileError, match=where(str(path), *parts)):
        load_concepts(path)


@pytest.mark.parametrize(
    "content, kwargs, parts",
    [
        ("Van Gogh\n\n# a comment\nvan gogh\n", {}, ("line 4 ('van gogh')", "field 'name'", "duplicate of line 1 ('Van Gogh')")),
        ("X Y\nA Person\n", {"anchor": "a person"}, ("line 2 ('A Person')", "field 'anchor'", "is the concept itself")),
        ("# only comments\n\n", {}, ("empty", "blank or a comment")),
        ("   \n\n", {}, ("the file is empty",)),
        ("X Y\n", {"templates": ["a photo of"]}, ("--anchor/--template arguments", "field 'templates'", "has no {}")),
        ("X Y\n", {"templates": "a photo of {}"}, ("--anchor/--template arguments", "field 'templates'", "must be a list")),
        ("X Y\n", {"templates": []}, ("--anchor/--template arguments", "field 'templates'", "no templates")),
        ("X Y\n", {"anchor": 3}, ("--anchor/--template arguments", "field 'anchor'", "must be a string")),
    ],
)
def test_bad_txt(tmp_path, content, kwargs, parts):
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(ConceptFileError, match=where(str(path), *parts)):
        load_concepts(path, **kwargs)


def test_keyword_templates_are_checked_for_yaml_too(tmp_path):
    path = write(tmp_path, "ok.yaml", "concepts: [X Y]\n")
    with pytest.raises(ConceptFileError, match=where(str(path), "--anchor/--template arguments", "field 'templates'", "{} {} ")):
        load_concepts(path, templates=["{} {} "])


@pytest.mark.parametrize(
    "content, parts",
    [
        ("name,anchr\nX Y,art\n", ("line 1 (header)", "field 'anchr'", "unknown column", "name, anchor, weight, templates")),
        ("name,weight\nX Y,heavy\n", ("line 2 ('X Y')", "field 'weight'", "positive finite number", "'heavy'")),
        ("name,weight\nX Y,0\n", ("line 2 ('X Y')", "field 'weight'", "positive finite number")),
        ("name,weight\nX Y,inf\n", ("line 2 ('X Y')", "field 'weight'", "positive finite number")),
        ("name,templates\nX Y,a photo of {}|a portrait\n", ("line 2 ('X Y')", "field 'templates'", "'a portrait' has no {}")),
        ("name,anchor\n,art\n", ("line 2", "field 'name'", "non-empty string")),
        ("name,anchor\nX Y,art\nx  y,art\n", ("line 3 ('x  y')", "field 'name'", "duplicate of line 2 ('X Y')")),
        ("name,anchor\nArt,art\n", ("line 2 ('Art')", "field 'anchor'", "is the concept itself")),
        ("name,anchor\nX Y,art,extra\n", ("line 2", "3 cells but the header has 2 columns")),
        ("name,anchor\n", ("empty", "header row only")),
        ("X Y,a person\n", ("line 1", "field 'name'", "2 cells", "header row with a 'name' column")),
        ("X Y\nZ W,a person\n", ("line 2", "field 'name'", "2 cells")),
        ("\n,\n", ("empty",)),
        ('name\n"X Y\n', ("line 2", "invalid CSV", "unexpected end of data")),
        ('name,anchor\nX Y, "a person"\nZ W,"a" person\n', ("line 3", "invalid CSV")),
    ],
)
def test_bad_csv(tmp_path, content, parts):
    path = write(tmp_path, "bad.csv", content)
    with pytest.raises(ConceptFileError, match=where(str(path), *parts)):
        load_concepts(path)


def test_missing_or_unsupported_files(tmp_path):
    with pytest.raises(ConceptFileError, match=where(str(tmp_path / "nowhere.yaml"), "concept file not found")):
        load_concepts(tmp_path / "nowhere.yaml")
    with pytest.raises(ConceptFileError, match=where(str(tmp_path), "not a file")):
        load_concepts(tmp_path)
    path = write(tmp_path, "concepts.toml", "concepts = ['X Y']\n")
    with pytest.raises(ConceptFileError, match=where(str(path), "unsupported concept file type '.toml'", ".yaml, .yml, .json, .txt, .csv")):
        load_concepts(path)
    path = tmp_path / "latin1.txt"
    path.write_bytes("Bj\xf6rk\n".encode("latin-1"))
    with pytest.raises(ConceptFileError, match=where(str(path), "not UTF-8")):
        load_concepts(path)


def test_missing_captions_file_is_looked_up_next_to_the_concept_file(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "captions.txt").write_text("a cat\n")  # in the cwd, not next to the file
    monkeypatch.chdir(tmp_path)
    path = write(sub, "c.yaml", "concepts: [X Y]\npreserve: {captions: captions.txt}\n")
    with pytest.raises(ConceptFileError, match=where(str(path), "preserve", "field 'captions'", str(sub / "captions.txt"))):
        load_concepts(path)


def test_errors_are_value_errors_with_their_parts(tmp_path):
    path = write(tmp_path, "bad.yaml", "concepts: [{name: X Y, weight: 0}]\n")
    with pytest.raises(ValueError) as info:
        load_concepts(path)
    err = info.value
    assert isinstance(err, ConceptFileError)
    assert (err.source, err.entry, err.field) == (str(path), "concepts[0] ('X Y')", "weight")
    assert str(err).startswith(f"{path}: concepts[0] ('X Y'): field 'weight': must be a positive finite number")


@pytest.mark.parametrize(
    "make, parts",
    [
        (lambda: Concept(""), ("<memory>", "concept ''", "field 'name'", "non-empty string")),
        (lambda: Concept(None), ("concept None", "field 'name'", "got NoneType")),
        (lambda: Concept("X Y", anchor=None), ("concept 'X Y'", "field 'anchor'", "must be a string")),
        (lambda: Concept("Art", anchor=" ART "), ("concept 'Art'", "field 'anchor'", "is the concept itself")),
        (lambda: Concept("X Y", templates=("a {} {}",)), ("concept 'X Y'", "field 'templates'", "2 {} placeholders")),
        (lambda: Concept("X Y", templates=()), ("concept 'X Y'", "field 'templates'", "no templates")),
        (lambda: Concept("X Y", templates="{}"), ("concept 'X Y'", "field 'templates'", "must be a list")),
        (lambda: Concept("X Y", weight=float("inf")), ("concept 'X Y'", "field 'weight'", "positive finite")),
        (lambda: ConceptSet(()), ("<memory>", "field 'concepts'", "empty")),
        (lambda: ConceptSet(("X Y",), source="s"), ("s", "concepts[0]", "must be a Concept")),
        (lambda: ConceptSet((Concept("X Y"), Concept("x y"))), ("concepts[1] ('x y')", "field 'name'", "duplicate of concepts[0]")),
        (lambda: ConceptSet((Concept("X Y"),), (Concept("x y"),)), ("preserve_concepts[0] ('x y')", "field 'name'", "also a concept to erase")),
        (lambda: ConceptSet((Concept("X Y"),), preserve_captions=("",)), ("preserve_captions[0]", "non-empty string")),
        (lambda: concepts_from_names(["X Y", "x y"]), ("<names>", "concepts[1] ('x y')", "duplicate")),
        (lambda: concepts_from_names(["X Y"], preserve=["X Y"]), ("<names>", "preserve.concepts[0] ('X Y')", "also a concept to erase")),
        (lambda: concepts_from_names([]), ("<names>", "field 'concepts'", "empty")),
        (lambda: concepts_from_names(["A Person"], anchor="a person"), ("<names>", "concepts[0] ('A Person')", "field 'anchor'")),
        (lambda: ConceptSet.from_dict({"concepts": ["X Y"]}, source="manifest.json", anchor="x y"), ("manifest.json", "concepts[0] ('X Y')", "field 'anchor'")),
    ],
)
def test_in_memory_construction_is_validated(make, parts):
    with pytest.raises(ConceptFileError, match=where(*parts)):
        make()


def test_per_concept_tokens_are_validated_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("concepts:\n  - {name: Arlen Corrance, anchor: a person, tokens: eot}\n  - Bexley Holloway\n")
    cs = load_concepts(path)
    assert [c.tokens for c in cs.concepts] == ["eot", None]
    again = ConceptSet.from_dict(cs.to_dict())
    assert again.concepts == cs.concepts
    path.write_text("concepts:\n  - {name: Arlen Corrance, tokens: words}\n")
    with pytest.raises(ConceptFileError, match=r"c\.yaml.*concepts\[0\].*'tokens'.*eot, concept, all"):
        load_concepts(path)
