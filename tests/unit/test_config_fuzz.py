"""Property-based: a mutated or random config either validates or raises ConfigError, nothing else."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import PACKAGED_EXAMPLE, ConfigError, validate_config

BASE = yaml.safe_load(PACKAGED_EXAMPLE.read_text())

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cpu", "gpu", "local", "auto", "fp16", "bf16", "training.models:mlp"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=8,
)


def paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from paths(value, prefix + (i,))


ALL_PATHS = [p for p in paths(BASE) if p]


def check(raw):
    try:
        validate_config(raw)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must list at least one problem"
        for problem in exc.problems:
            assert problem.message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), values), min_size=1, max_size=4))
def test_mutated_valid_config(mutations):
    raw = copy.deepcopy(BASE)
    for path, value in mutations:
        node = raw
        try:
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    check(raw)


@settings(max_examples=100, deadline=None)
@given(values)
def test_random_yaml_structure(raw):
    check(raw)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(list(BASE) + ["tuning", "export", "bogus"]), values, max_size=4))
def test_random_sections(raw):
    check(raw)
