"""ONNX files: load with clear errors, atomic save/copy with external data, hashing and summaries.

A graph is saved into a temporary folder beside the target under its final file names
(``<name>.onnx`` and ``<name>.onnx.data``), then the data file is renamed into place first and the
``.onnx`` last, so an interrupted run never leaves an ``.onnx`` that looks finished but is not.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from ..errors import GraphError, InputError

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message above 2 GiB; stay clear of it (the graph itself adds bytes).
EXTERNAL_DATA_THRESHOLD = int(1.8 * (1 << 30))
_CHUNK = 16 << 20


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; InputError when no such file exists."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    return p


def load_onnx(path: str | os.PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model; raise InputError for a missing file and GraphError for one ONNX cannot read."""
    p = check_file(path)
    try:
        return onnx.load(str(p), load_external_data=load_external_data)
    except DecodeError as exc:
        raise GraphError(f"{p} is not a valid ONNX protobuf file: {exc}") from exc
    except (FileNotFoundError, onnx.checker.ValidationError) as exc:
        raise GraphError(f"cannot load the external data of {p}: {exc}") from exc


def as_model(model: str | os.PathLike | onnx.ModelProto, load_external_data: bool = False) -> onnx.ModelProto:
    """``model`` itself when it is a ModelProto, else the graph loaded from that path."""
    return model if isinstance(model, onnx.ModelProto) else load_onnx(model, load_external_data)


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from subgraphs(g)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes (Constant values) of every graph."""
    for g in subgraphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    count = 1
    for d in t.dims:
        count *= d
    return count * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers and Constant attributes (in memory or external), all subgraphs included."""
    return sum(_tensor_nbytes(t) for t in all_tensors(model))


def _unloaded_external(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in all_tensors(model)
            if external_data_helper.uses_external_data(t) and not t.HasField("raw_data")]


def move_into_place(tmp_dir: Path, target: Path) -> None:
    """Rename the data files first and the .onnx last, then drop a stale data file the new graph does not use
    (never one that another graph in the folder still references)."""
    names = sorted((p.name for p in tmp_dir.iterdir()), key=lambda n: n == target.name)
    for name in names:
        os.replace(tmp_dir / name, target.parent / name)
    stale = target.parent / f"{target.name}.data"
    if f"{target.name}.data" in names or not stale.is_file():
        return
    if stale.resolve() in referenced_data_files(target.parent):
        logger.debug("kept %s: another graph in %s references it", stale.name, target.parent)
        return
    stale.unlink()
    logger.debug("removed %s: the new %s does not use it", stale.name, target.name)


# .onnx files above this size are not read when looking for graphs that reference a data file: a graph with
# external data is a small header (megabytes), and reading multi-GB single-file graphs would cost GBs of memory.
HEADER_SCAN_MAX_BYTES = 256 << 20


def referenced_data_files(folder: Path, exclude: frozenset[Path] = frozenset()) -> set[Path]:
    """Resolved paths of the external data files that the ``*.onnx`` graphs in ``folder`` (not in ``exclude``,
    not hidden temporaries) reference."""
    found: set[Path] = set()
    skip = {p.resolve() for p in exclude}
    for graph in folder.glob("*.onnx"):
        if graph.name.startswith(".") or graph.resolve() in skip or graph.stat().st_size > HEADER_SCAN_MAX_BYTES:
            continue
        try:
            found.update(f.resolve() for f in external_data_files(graph))
        except (GraphError, OSError) as exc:  # an unreadable graph references nothing we can name
            logger.debug("not scanned for data references: %s (%s)", graph, exc)
    return found


@contextlib.contextmanager
def staged_save(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write a graph (``target.name``) and its data files into; they are
    moved into place (data first, graph last) when the block ends without error, and the folder is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp_dir
        move_into_place(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_onnx(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    restore: bool = True,
) -> Path:
    """Save ``model`` atomically to ``path``; external data (``<name>.onnx.data``) when asked or when large.

    ``external_data=None`` chooses external data when the tensors exceed ~1.8 GB. ONNX's saver moves
    tensor bytes out of the in-memory model; with ``restore`` they are read back so ``model`` stays usable
    (pass False to save memory and time when the caller drops the model).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"output directory is not writable: {target.parent}")
    missing = _unloaded_external(model)
    if missing:
        raise GraphError(f"cannot save {target.name}: {len(missing)} tensors (e.g. {missing[0]!r}) reference external "
                         "data that was not loaded; load with load_external_data=True or use copy_onnx")
    nbytes = tensor_bytes(model)
    use_external = nbytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    with staged_save(target) as tmp_dir:
        tmp_file = tmp_dir / target.name
        try:
            if use_external:
                onnx.save_model(model, str(tmp_file), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=f"{target.name}.data", size_threshold=1024)
            else:
                onnx.save_model(model, str(tmp_file))
        except ValueError as exc:  # protobuf refuses messages above 2 GiB
            raise GraphError(f"cannot serialise {target.name} ({nbytes / 2**30:.2f} GiB of tensors, "
                             f"external data: {use_external}): {exc}") from exc
    if use_external and restore:
        external_data_helper.load_external_data_for_model(model, str(target.parent))
    logger.info("saved %s (%.1f MB of tensors, external data: %s)", target, nbytes / 1e6, use_external)
    return target


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file references (sorted, unique, relative to its folder)."""
    p = check_file(path)
    model = load_onnx(p, load_external_data=False)
    names = set()
    for t in all_tensors(model):
        if external_data_helper.uses_external_data(t):
            names.add(external_data_helper.ExternalDataInfo(t).location)
    return [p.parent / n for n in sorted(names)]


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def graph_bytes(path: str | os.PathLike) -> int:
    """Size on disk of an ONNX file plus its external data files."""
    p = check_file(path)
    return p.stat().st_size + sum(f.stat().st_size for f in external_data_files(p) if f.is_file())


def _stream_tensor(src: Any, out: Any, info: Any, transform: Callable[[bytes], bytes] | None) -> tuple[int, int]:
    """Copy one external tensor's bytes from the open file ``src`` to ``out`` (4 KiB aligned), through
    ``transform`` when given; returns (offset, length) in ``out``."""
    src.seek(info.offset or 0)
    out.write(b"\0" * ((-out.tell()) % 4096))
    offset = out.tell()
    if transform is not None:
        out.write(transform(src.read() if info.length is None else src.read(info.length)))
        return offset, out.tell() - offset
    remaining = info.length
    while remaining is None or remaining > 0:
        chunk = src.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
        if not chunk:
            break
        out.write(chunk)
        remaining = None if remaining is None else remaining - len(chunk)
    return offset, out.tell() - offset


def _write_streamed_data(model: onnx.ModelProto, src_dir: Path, data_file: Path,
                         transforms: dict[str, Callable[[bytes], bytes]]) -> int:
    """Write every external tensor of ``model`` (read from its file under ``src_dir``) into ``data_file`` and
    point the tensor there; returns the number of tensors written."""
    external = [t for t in all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not external:
        return 0
    handles: dict[str, Any] = {}
    try:
        with open(data_file, "wb") as out:
            for t in external:
                info = external_data_helper.ExternalDataInfo(t)
                if info.location not in handles:
                    handles[info.location] = open(src_dir / info.location, "rb")
                offset, length = _stream_tensor(handles[info.location], out, info, transforms.get(t.name))
                _set_location(t, data_file.name, offset, length)
    except FileNotFoundError as exc:
        raise GraphError(f"external data of a graph in {src_dir} is missing: {exc}") from exc
    finally:
        for f in handles.values():
            f.close()
    return len(external)


def write_streamed(model: onnx.ModelProto, src_dir: str | os.PathLike, dst: str | os.PathLike,
                   transforms: dict[str, Callable[[bytes], bytes]] | None = None) -> Path:
    """Save ``model`` (loaded with ``load_external_data=False`` from a graph in ``src_dir``) atomically to ``dst``;
    its external tensors are streamed one at a time into ``<dst>.data``, the bytes of the tensor named ``k``
    through ``transforms[k]`` (e.g. an fp16 conversion). Memory: the graph structure plus one tensor."""
    dst_p = Path(dst)
    with staged_save(dst_p) as tmp_dir:
        count = _write_streamed_data(model, Path(src_dir), tmp_dir / f"{dst_p.name}.data", transforms or {})
        onnx.save_model(model, str(tmp_dir / dst_p.name))
    logger.info("wrote %s (%d external tensors streamed)", dst_p, count)
    return dst_p


def save_sharing(model: onnx.ModelProto, src_dir: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Save ``model`` (loaded with ``load_external_data=False`` from a graph in ``src_dir``) atomically to ``dst``
    so that its external tensors keep using the data files they reference: in ``src_dir`` itself only the graph
    structure is written (relative locations unchanged). In another folder the tensors are streamed into
    ``<dst>.data`` (onnx refuses hard-linked data files as a possible hard-link attack)."""
    src_p, dst_p = Path(src_dir), Path(dst)
    if src_p.resolve() != dst_p.parent.resolve():
        return write_streamed(model, src_p, dst_p)
    with staged_save(dst_p) as tmp_dir:
        onnx.save_model(model, str(tmp_dir / dst_p.name))
    shared = sorted({external_data_helper.ExternalDataInfo(t).location for t in all_tensors(model)
                     if external_data_helper.uses_external_data(t)})
    logger.info("saved %s (graph structure only; tensors stay in %s)", dst_p, ", ".join(shared) or "the graph")
    return dst_p


def copy_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy an ONNX graph and its external data under ``dst``'s name, streaming tensors (low memory), atomically."""
    src_p, dst_p = check_file(src), Path(dst)
    if src_p.resolve() == dst_p.resolve():
        raise InputError(f"copy_onnx: source and destination are the same file: {src_p}")
    return write_streamed(load_onnx(src_p, load_external_data=False), src_p.parent, dst_p)


def remove_graphs(graphs: list[Path]) -> list[Path]:
    """Delete the ONNX files ``graphs``, then each of their external data files that no graph left in its folder
    references (a data file a kept graph uses is never deleted); returns the paths deleted."""
    data = {f.resolve() for g in graphs if g.is_file() for f in external_data_files(g)}
    removed = []
    for g in graphs:
        if g.is_file():
            g.unlink()
            removed.append(g)
    still_used: set[Path] = set()
    for folder in {d.parent for d in data}:
        still_used |= referenced_data_files(folder)
    for d in sorted(data - still_used):
        if d.is_file():
            d.unlink()
            removed.append(d)
    return removed


def onnx_sha256(path: str | os.PathLike) -> str:
    """SHA-256 over the .onnx file followed by each external data file it references (in name order)."""
    p = check_file(path)
    h = hashlib.sha256()
    for f in [p, *external_data_files(p)]:
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError as exc:
            raise GraphError(f"external data file of {p} is missing: {f}") from exc
    return h.hexdigest()


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type.tensor_type
    shape: list[int | str | None] | None = None
    if t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
    if t.elem_type == onnx.TensorProto.BFLOAT16:
        dtype = "bfloat16"
    return {"name": v.name, "shape": shape, "dtype": dtype}


def io_summary(path_or_model: str | os.PathLike | onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Graph inputs and outputs as ``{"inputs": [{name, shape, dtype}], "outputs": [...]}`` (initializers excluded)."""
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else load_onnx(path_or_model, False)
    inits = {t.name for t in model.graph.initializer}
    return {"inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
            "outputs": [_value_info(v) for v in model.graph.output]}


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type over the graph and its subgraphs, most frequent first (``domain::Op`` for custom ops)."""
    counts: collections.Counter[str] = collections.Counter()
    for g in subgraphs(model.graph):
        for n in g.node:
            counts[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
    return dict(counts.most_common())


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes of ``graph`` (top level) that read it."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values of the top-level graph, by the tensor name they define."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    out[node.output[0]] = a.t
    return out


def node_count(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in subgraphs(model.graph))
