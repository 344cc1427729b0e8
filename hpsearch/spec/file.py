"""A spec file → plain data, refusing what is not what it says before anything is built from it.

The file must be a regular file of UTF-8 YAML of a sane size (a FIFO, a device or a socket is named,
never waited on); a key given twice in one mapping is refused (PyYAML keeps the last, silently), and
so is a document whose aliases would expand it past any real spec's size, or into itself.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from hpsearch.errors import SpecError

_MAX_SPEC_BYTES = 1_000_000  # a study spec is a few KB: a file this large is not one
_MAX_YAML_NODES = 100_000  # values a spec may expand to through aliases (a real one has hundreds)


def read_yaml(path: Path) -> Any:
    """Return the plain data in the YAML spec file at ``path`` (None for an empty document)."""
    return _parse_yaml(_read_spec_file(path), path)


def _read_spec_file(path: Path) -> str:
    """Return the text of the spec file at ``path``; refuse what is not a readable regular file of a sane size."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, silently.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file. Expected a YAML study spec, e.g. studies/quickstart.yaml.") \
            from None
    except OSError as exc:  # a socket cannot be opened at all: say what it is, not only that it failed
        with contextlib.suppress(OSError):
            _refuse_special(path, os.stat(path).st_mode)
        raise SpecError(f"{path}: cannot open the spec file ({exc.strerror or exc}).") from None
    try:
        _refuse_special(path, os.fstat(fd).st_mode)
    except SpecError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(_MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"{path}: cannot read the spec file ({exc.strerror or exc}).") from None
    if len(data) > _MAX_SPEC_BYTES:
        raise SpecError(f"{path}: the spec file is larger than {_MAX_SPEC_BYTES:,} bytes; a study spec is a few "
                        "KB of YAML. Is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: cannot read the spec file ({exc}); a spec must be UTF-8 text.") from None


def _refuse_special(path: Path, mode: int) -> None:
    """Refuse a spec path that is not a regular file (a directory, a FIFO, a device...), naming what it is."""
    kind = _file_kind(mode)
    if kind:
        raise SpecError(f"{path}: is a {kind}, not a regular file. Expected a YAML study spec on disk, e.g. "
                        "studies/quickstart.yaml (write what a pipe or device gives into a file first).")


def _file_kind(mode: int) -> str | None:
    """Return what a file of ``mode`` is, in words, when it is not a regular file (else None)."""
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe (FIFO)"),
             (stat.S_ISCHR, "character device (like /dev/null)"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in kinds if test(mode)), "special file")


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.get(key)
            except TypeError:  # an unhashable key: the base class names it
                continue
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping (first at line {seen.line + 1}); "
                    "YAML would keep only the last one. Remove one of them", key_node.start_mark)
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, path: Path) -> Any:
    """Return the plain data in the YAML ``text``; refuse bad YAML, duplicate keys and alias bombs."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path)  # on the node graph, before any alias is expanded into objects
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: the file is not valid YAML{where}: {problem}.") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML nests deeper than can be read (hundreds of levels); a study spec nests "
                        "a few levels.") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand it past _MAX_YAML_NODES nodes, or into itself."""
    sizes: dict[int, int] = {}  # expanded size per node: each shared (aliased) node is counted once
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise SpecError(f"{path}: line {node.start_mark.line + 1}: an alias refers to a node that contains it, "
                            "so the document would be infinite. Expected plain values (aliases only to finished "
                            "nodes).")
        open_nodes.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total = min(total + size(child), _MAX_YAML_NODES + 1)  # capped: the number itself stays small
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    if size(root) > _MAX_YAML_NODES:
        raise SpecError(f"{path}: the YAML expands to more than {_MAX_YAML_NODES:,} values through its aliases "
                        "(&anchor / *alias); a study spec has a few hundred. Refusing to build it.")
