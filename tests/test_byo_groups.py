"""Feature groups (one [[features]] block, many features: names, a glob pattern or a regex over a
store table's columns) and tables without entities (features read from the events rows).

Patterns resolve against a real Parquet table written to a temporary offline store."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from feature_store import FeatureSet, OfflineStore
from recsys_moe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
FEATURES_DIR = ROOT / "configs" / "features"

PERSON = """
[entities.person]
key = "person_id"
table = "persons"
time = "valid_from"

[events]
table = "events"
time = "ts"
keys = ["event_id"]
"""
# a plain table of rows: no entity, no time; the features are columns of the events
PLAIN = """
[events]
table = "rows"
keys = ["row_id"]
"""


def _columns(store: OfflineStore):  # noqa: ANN202 - the TableColumns callable
    return lambda table: store.scan(table).collect_schema().names()


@pytest.fixture
def store(tmp_path: Path) -> OfflineStore:
    """persons (key, time, x_0..x_11, z, seg) and rows (row_id, a_0..a_2, y) tables."""
    root = tmp_path / "data"
    root.mkdir()
    persons = {"person_id": [1, 2], "valid_from": [None, None]}
    persons |= {f"x_{j}": [0.5, 1.5] for j in range(12)} | {"z": [1.0, 2.0], "seg": ["a", "b"]}
    pl.DataFrame(persons).with_columns(pl.col("valid_from").cast(pl.Datetime)).write_parquet(
        root / "persons.parquet"
    )
    rows = {"row_id": [1, 2], "a_0": [0.1, 0.2], "a_1": [1.0, 2.0], "a_2": [3.0, 4.0], "y": [1, 0]}
    pl.DataFrame(rows).write_parquet(root / "rows.parquet")
    return OfflineStore(root)


def test_names_group_is_the_same_set_as_one_block_per_feature() -> None:
    group = PERSON + '[[features]]\nnames = ["b", "a", "c"]\nentity = "person"\nkind = "numeric"\n'
    group += 'transform = "log1p"\n'
    by_hand = PERSON + "".join(
        f'[[features]]\nname = "{n}"\nentity = "person"\nkind = "numeric"\ntransform = "log1p"\n'
        for n in ("b", "a", "c")
    )
    fs = FeatureSet.from_toml(group)
    assert [(f.name, f.column, f.transform) for f in fs.features] == [
        ("b", "b", "log1p"), ("a", "a", "log1p"), ("c", "c", "log1p")
    ]  # fmt: skip
    assert fs.fingerprint() == FeatureSet.from_toml(by_hand).fingerprint()
    assert fs.source == group  # no pattern: the file's own text is kept


def test_pattern_and_regex_expand_in_table_order(store: OfflineStore) -> None:
    text = (
        PERSON
        + """
[[features]]
name = "seg"
entity = "person"
kind = "categorical"
num_embeddings = 4

[[features]]
pattern = "x_*"
entity = "person"
kind = "numeric"
exclude = ["x_1?"]
"""
    )
    fs = FeatureSet.from_toml(text, columns=_columns(store))
    names = [f.name for f in fs.features]
    assert names == ["seg"] + [f"x_{j}" for j in range(10)]  # x_10, x_11 excluded
    assert all(f.kind == "numeric" and f.entity == "person" for f in fs.features[1:])
    regex = text.replace('pattern = "x_*"', 'regex = "x_[0-9]"').replace('exclude = ["x_1?"]', "")
    assert FeatureSet.from_toml(regex, columns=_columns(store)).fingerprint() == fs.fingerprint()
    by_hand = FeatureSet.from_toml(
        text.split("[[features]]\npattern")[0]
        + "".join(
            f'[[features]]\nname = "x_{j}"\nentity = "person"\nkind = "numeric"\n\n'
            for j in range(10)
        )  # fmt: skip
    )
    assert fs.fingerprint() == by_hand.fingerprint()  # the fingerprint is of the expansion


def test_an_expanded_set_reloads_without_the_store(store: OfflineStore) -> None:
    text = PERSON + '[[features]]\npattern = "x_*"\nentity = "person"\nkind = "numeric"\n'
    fs = FeatureSet.from_toml(text, columns=_columns(store))
    assert fs.source != text and "pattern" not in fs.source.split("\n", 1)[1]
    again = FeatureSet.from_toml(fs.source)  # what a bundle or a run keeps: no columns needed
    assert again.fingerprint() == fs.fingerprint() and again.features == fs.features


def test_a_config_resolves_patterns_against_its_store(tmp_path: Path, store: OfflineStore) -> None:
    (tmp_path / "features.toml").write_text(
        PERSON + '[[features]]\npattern = "x_*"\nentity = "person"\nkind = "numeric"\n'
    )
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('features = "features.toml"\n')
    cfg = load_config(cfg_file, [], workdir=tmp_path)
    assert cfg.store_dir == store.root
    assert len(cfg.feature_set().dense) == 12
    other = load_config(cfg_file, ["data.store=elsewhere"], workdir=tmp_path)
    with pytest.raises(ValueError, match=r"features\[0\] \(pattern 'x_\*'\).*'persons' not found"):
        other.feature_set()


def test_every_shipped_definition_round_trips_through_to_toml() -> None:
    for path in sorted(FEATURES_DIR.glob("*.toml")):
        fs = FeatureSet.load(path)
        again = FeatureSet.from_toml(fs.to_toml(), where=path.name)
        assert again.fingerprint() == fs.fingerprint(), path.name
        assert again.features == fs.features and again.entities == fs.entities, path.name


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ('pattern = "q_*"\nentity = "person"',
         r"features\[1\] \(pattern 'q_\*'\): pattern 'q_\*' matches no column of table "
         r"'persons' .*its columns: person_id, valid_from, x_0"),
        ('regex = "x_.*"\nentity = "person"\nexclude = ["x_*"]',
         r"features\[1\] \(regex 'x_\.\*'\): regex 'x_\.\*' matches no column .*\(after exclude\)"),
        ('pattern = "x_1*"\nentity = "person"',  # x_1 is also features[0]'s
         r"features\[1\] \(pattern 'x_1\*'\): duplicate feature name 'x_1' \(also declared by "
         r"features\[0\] \(x_1\)\); feature names must be unique"),
        ('names = ["z", "z"]\nentity = "person"',
         r"features\[1\] \(names \['z', 'z'\]\): duplicate feature name 'z'; feature names"),
        ('names = ["z"]\nname = "z"\nentity = "person"',
         r"exactly one of name, names \(a list\), pattern \(a glob\) or regex; got \['name', "),
        ('entity = "person"', r"features\[1\] \(\?\): .*exactly one of name, .*got none"),
        ('names = []\nentity = "person"', r"names must be a non-empty list of strings, got \[\]"),
        ('names = ["z"]\ncolumn = "x_2"\nentity = "person"', r"column is for a single feature"),
        ('names = ["z"]\nexclude = ["z"]\nentity = "person"', r"exclude applies to pattern"),
        ('regex = "x_("\nentity = "person"', r"regex 'x_\(' does not compile"),
        ('pattern = "x_*"\nentity = "nobody"', r"unknown entity 'nobody'"),
    ],
)  # fmt: skip
def test_group_errors_name_the_block(store: OfflineStore, block: str, message: str) -> None:
    text = PERSON + '[[features]]\nname = "x_1"\nentity = "person"\nkind = "numeric"\n\n'
    text += f'[[features]]\n{block}\nkind = "numeric"\n'
    with pytest.raises(ValueError, match=message):
        FeatureSet.from_toml(text, where="f.toml", columns=_columns(store))


def test_a_pattern_needs_the_store() -> None:
    text = PERSON + '[[features]]\npattern = "x_*"\nentity = "person"\nkind = "numeric"\n'
    with pytest.raises(ValueError, match=r"f.toml features\[0\] \(pattern 'x_\*'\): a pattern is "
                       r"resolved against the columns of table 'persons'"):  # fmt: skip
        FeatureSet.from_toml(text, where="f.toml")


def test_a_plain_table_needs_no_entity_nor_time(store: OfflineStore) -> None:
    text = PLAIN + '[[features]]\npattern = "a_*"\nkind = "numeric"\n'
    fs = FeatureSet.from_toml(text, columns=_columns(store))  # the events table's columns
    assert [f.name for f in fs.features] == ["a_0", "a_1", "a_2"]
    assert fs.entities == {} and fs.events.time == ""
    assert fs.event_features == fs.features and fs.dense == fs.features
    assert FeatureSet.from_toml(fs.source).fingerprint() == fs.fingerprint()
    # the events' keys are not features of a pattern: "*" takes everything but row_id
    star = FeatureSet.from_toml(PLAIN + '[[features]]\npattern = "*"\nexclude = ["y"]\n'
                                'kind = "numeric"\n', columns=_columns(store))  # fmt: skip
    assert [f.name for f in star.features] == ["a_0", "a_1", "a_2"]


def test_entities_need_the_event_time() -> None:
    text = PERSON.replace('time = "ts"\n', "") + '[[features]]\nname = "z"\nentity = "person"\n'
    with pytest.raises(ValueError, match=r"\[events\]: missing required key 'time': the entities "
                       r"\['person'\] are joined as of each event's time"):  # fmt: skip
        FeatureSet.from_toml(text + 'kind = "numeric"\n')


def test_event_features_are_the_entity_less_and_the_key_columns() -> None:
    text = (
        PERSON
        + """
[[features]]
name = "person_id"
entity = "person"
kind = "categorical"
num_embeddings = 10

[[features]]
name = "z"
entity = "person"
kind = "numeric"

[[features]]
names = ["hour", "device"]
kind = "numeric"
"""
    )
    fs = FeatureSet.from_toml(text)
    assert [f.name for f in fs.event_features] == ["person_id", "hour", "device"]
    assert fs.joined_columns("person") == ["z"]
