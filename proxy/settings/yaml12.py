"""Reading the config file: YAML with YAML 1.2's scalars and bounds a hostile or careless file cannot pass.

Off the data path (start-up, reload; the reload runs it in a thread). PyYAML alone reads YAML 1.1:
`on`, `off`, `yes`, `no` become booleans (so `retry: {on: [...]}` would key the section by `True`) and
`1:30` is sexagesimal 90. Here only `true`/`false` are booleans and such words stay strings. A key given
twice is an error, not a silent last-one-wins. Bounds: the file's size, the nesting depth, and the nodes
that aliases expand to — `*a` of a node with 1,000 children counts 1,000 — so a few hundred bytes of
nested anchors (a "billion laughs") cannot blow up into gigabytes when the config is walked.

libyaml parses and composes (about 3× faster than PyYAML's own parser: a 0.75 MB config in 1.5 s here, in a
thread on reload); the bounds are then checked on the composed nodes, before a Python object is built, and
this module's resolver and constructor give the YAML 1.2 scalars and refuse a key given twice.
"""

from __future__ import annotations

import re

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_ALIAS_EXPANSION = 1000

_BOOL_12 = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class _Resolver(yaml.resolver.Resolver):
    pass


# YAML 1.2's core schema where 1.1 differs: booleans are true/false only; no sexagesimal numbers.
_Resolver.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_Resolver.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_12, list("tTfF"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


try:  # libyaml's parser and composer (it refuses nesting past 1,000 itself); else PyYAML's own
    from yaml.cyaml import CParser as _Parser

    def _init_parser(loader, stream) -> None:
        _Parser.__init__(loader, stream)
except ImportError:  # pragma: no cover - PyYAML's wheels for Linux carry libyaml
    class _Parser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer):
        pass

    def _init_parser(loader, stream) -> None:
        yaml.reader.Reader.__init__(loader, stream)
        yaml.scanner.Scanner.__init__(loader)
        yaml.parser.Parser.__init__(loader)
        yaml.composer.Composer.__init__(loader)


class _Loader(_Parser, yaml.constructor.SafeConstructor, _Resolver):
    def __init__(self, stream) -> None:
        _init_parser(self, stream)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                if key in seen and key != "<<":
                    raise ConstructorError("while reading a mapping", node.start_mark,
                                           f"the key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check(root) -> None:
    """Depth and alias expansion of the composed document, before anything is built from it. An alias
    is the same node object met again: it counts the nodes it stands for. Iterative: no recursion."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    expanded = 0
    stack = [(root, 1, False)]
    while stack:
        node, depth, finished = stack.pop()
        key = id(node)
        if finished:
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in _children(node))
            on_path.discard(key)
            continue
        if key in sizes or key in on_path:  # met again: an alias
            expanded += sizes.get(key, 1)
            if expanded > MAX_ALIAS_EXPANSION:
                raise ComposerError(None, None, f"aliases of this node expand to more than {MAX_ALIAS_EXPANSION} "
                                    "nodes", node.start_mark)
            continue
        if depth > MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in reversed(_children(node)))


def load(data: bytes, source: str = "<config>"):
    """The document in `data` (bytes, UTF-8), or raise yaml.YAMLError / ValueError naming the problem."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"larger than {MAX_BYTES // 1024} KiB ({len(data)} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the composer recurses per level: far past MAX_DEPTH anyway
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        _check(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _construct_int(loader: _Loader, node) -> int:
    """YAML 1.2: `012` is twelve (1.1 read it as octal); `0o12` is octal, `0x1f` hex."""
    value = loader.construct_scalar(node)
    sign, digits = (-1, value[1:]) if value[0] == "-" else (1, value.lstrip("+"))
    if digits.startswith("0o"):
        return sign * int(digits[2:], 8)
    if digits.startswith("0x"):
        return sign * int(digits[2:], 16)
    return sign * int(digits, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
