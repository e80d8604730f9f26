"""The netplan YAML reader against PyYAML: netplan's own examples and generated documents."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from vmferry.guest.linux.rules.network_yaml import (
    Mapping,
    Opaque,
    Scalar,
    Sequence,
    UnsupportedYamlError,
    last_line,
    parse,
)

try:  # the oracle; a test extra ("pyyaml"), not a vmferry dependency
    import yaml
except ImportError:  # pragma: no cover
    if os.environ.get("CI"):
        raise
    pytest.skip("PyYAML is not installed (pip install pyyaml)", allow_module_level=True)
EXAMPLES = "/usr/share/doc/netplan/examples/*.yaml"


def as_python(node: object) -> object:
    """Our tree as PyYAML would load it: scalars' and flow values' text loaded by PyYAML."""
    if isinstance(node, (Scalar, Opaque)):
        return yaml.safe_load(node.text)
    if isinstance(node, Mapping):
        return {e.key: as_python(e.value) for e in node.entries}
    if isinstance(node, Sequence):
        return [as_python(i) for i in node.items]
    return node


def test_netplan_examples_read_like_pyyaml() -> None:
    require_tool("netplan")  # netplan.io ships the examples
    files = sorted(glob.glob(EXAMPLES))
    assert len(files) > 10
    for path in files:
        text = Path(path).read_text()
        assert as_python(parse(text)) == yaml.safe_load(text), path


def test_positions_comments_and_sequences_at_key_indent() -> None:
    text = (
        "# head\n"
        "network:\n"
        "  version: 2   # trailing\n"
        "\n"
        "  ethernets:\n"
        "    eth0:\n"
        "      addresses:\n"
        "      - 10.0.0.2/24\n"
        "      - '10.0.0.3/24'  # q\n"
        "      routes:\n"
        "        - to: default\n"
        "          via: 10.0.0.1\n"
        "      match: {macaddress: '00:11:22:33:44:55'}\n"
        "      nameservers:\n"
        "        addresses: [1.1.1.1, '8.8.8.8']\n"
    )
    root = parse(text)
    assert as_python(root) == yaml.safe_load(text)
    assert isinstance(root, Mapping)
    net = root.get("network")
    assert isinstance(net, Mapping)
    eths = net.get("ethernets")
    assert isinstance(eths, Mapping)
    (eth0,) = eths.entries
    assert (eth0.key, eth0.line, eth0.indent) == ("eth0", 5, 4)
    assert isinstance(eth0.value, Mapping)
    match = eth0.value.get("match")
    assert isinstance(match, Opaque) and match.line == 12
    assert last_line(eth0.value, eth0.line) == 14
    routes = eth0.value.entry("routes")
    assert routes is not None and last_line(routes.value, routes.line) == 11


@pytest.mark.parametrize(
    "text",
    [
        "network: &n\n  version: 2\n",  # anchor
        "a: &x 1\nb: *x\n",  # anchor and alias
        "network: !!map\n  version: 2\n",  # tag
        "network:\n  version: 2\n---\nnetwork:\n  version: 2\n",  # second document
        "network:\n\tversion: 2\n",  # tab
        "network:\n  ethernets: [eth0,\n    eth1]\n",  # flow collection over lines
        "network:\n  x: a plain\n    scalar over lines\n",
        "network:\n  x: 'quoted over\n    lines'\n",
        "network:\n  x: 1\n  x: 2\n",  # duplicate key
        "- a\n- b\n",  # not a mapping at the top
        "network:\r\n  version: 2\r\n",
        'network:\n  x: "esc\\taped"\n',
    ],
)
def test_outside_the_subset_is_refused(text: str) -> None:
    with pytest.raises(UnsupportedYamlError):
        parse(text)


def test_refused_inputs_are_mostly_valid_yaml() -> None:
    # the refusals above are about vmferry's subset, not invalid YAML: PyYAML reads these
    for text in (
        "network: &n\n  version: 2\n",
        "network:\n  ethernets: [eth0,\n    eth1]\n",
        "network:\n  x: a plain\n    scalar over lines\n",
        "network:\n  x: 'quoted over\n    lines'\n",
    ):
        assert yaml.safe_load(text)


_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0-_", min_size=1, max_size=8).filter(
    lambda k: k[0].isalpha()
)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-1000, 100000),
    st.text(alphabet="abcdefXYZ019:./-_ *#'\"", min_size=0, max_size=20),
)
#: netplan-shaped trees: mappings nest freely, sequence items are scalars or mappings (a list
#: directly inside a list, "- - x", is outside the subset and netplan never uses one)
_trees = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(st.one_of(_scalars, st.dictionaries(_keys, kids, max_size=4)), max_size=4),
        st.dictionaries(_keys, kids, min_size=0, max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _trees, min_size=1, max_size=4), st.sampled_from([2, 4]))
def test_block_documents_from_pyyaml_read_back(doc: dict, indent: int) -> None:
    text = yaml.safe_dump(doc, default_flow_style=False, sort_keys=False, indent=indent)
    assert as_python(parse(text)) == doc


def test_list_in_list_is_refused_not_misread() -> None:
    text = yaml.safe_dump({"a": [[1, 2], 3]}, default_flow_style=False)
    with pytest.raises(UnsupportedYamlError, match="nested sequence"):
        parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "".join(f"{' ' * i}k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n",
        "".join(f"{'  ' * i}- a{i}:\n" for i in range(200)),
        "a:\n" + "".join(f"{'  ' * i}- b:\n" for i in range(1, 400)),
    ],
)
def test_deep_nesting_is_refused(text: str) -> None:
    with pytest.raises(UnsupportedYamlError, match="deeper"):
        parse(text)


def _str_keys(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=" \n-:#'\"[]{},|>abc1?&*!", max_size=80))
def test_any_text_is_refused_by_name_or_read_as_pyyaml_reads_it(text: str) -> None:
    """Differential: whatever the reader accepts, PyYAML accepts and reads the same way (keys
    compared as strings: netplan keys are strings)."""
    try:
        tree = parse(text)
    except UnsupportedYamlError:
        return
    assert _str_keys(as_python(tree)) == _str_keys(yaml.safe_load(text))
