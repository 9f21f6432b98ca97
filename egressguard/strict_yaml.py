"""Strict YAML for policies: PyYAML's safe loader refusing aliases, duplicate keys and typed nodes."""

from __future__ import annotations

from typing import Any

import yaml

YAMLError = yaml.YAMLError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and aliases (no billion-laughs expansion)."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in a policy", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        _refuse_duplicate_keys(self, node, deep)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_keys(loader: Any, node: Any, deep: bool) -> None:
    keys: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict)):
            raise yaml.constructor.ConstructorError(None, None, "mapping keys must be strings", key_node.start_mark)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)


def _refuse_aliases(root: Any) -> None:
    """An alias makes the composed graph share a node: refuse any node reached twice."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in a policy", node.start_mark
            )
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)


if getattr(yaml, "__with_libyaml__", False):

    class _FastStrictLoader(yaml.CSafeLoader):  # type: ignore[name-defined,misc]
        """libyaml's parser with _StrictLoader's refusals. The pure-Python scanner takes tens of
        seconds on deep nesting or a multi-megabyte line; libyaml is fast and caps nesting itself."""

        def get_single_data(self) -> Any:
            node = self.get_single_node()
            if node is None:
                return None
            _refuse_aliases(node)
            return self.construct_document(node)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            _refuse_duplicate_keys(self, node, deep)
            return super().construct_mapping(node, deep=deep)

    _LOADER: type[Any] = _FastStrictLoader  # CSafeLoader-based: not a SafeLoader subclass
else:  # pragma: no cover - PyYAML built without libyaml
    _LOADER = _StrictLoader


def _refuse_tag(loader: Any, node: Any) -> Any:
    """!!set, !!omap, !!pairs, !!binary: nothing in a policy is one, and a set's order is random."""
    raise yaml.constructor.ConstructorError(
        None, None, f"YAML type {node.tag.rsplit(':', 1)[-1]} is not allowed in a policy", node.start_mark
    )


for _tag in ("set", "omap", "pairs", "binary"):
    for _loader in {_LOADER, _StrictLoader}:
        _loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)  # type: ignore[attr-defined]


def load(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader
