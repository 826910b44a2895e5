"""Orbax checkpoints of a run: parameters, optimizer state and metadata as separate items.

`generate` and `eval` restore the parameters alone; training restores all.
Metadata (JSON, one layout for every writer: `CheckpointMeta`) holds the step,
the optimizer updates, the PRNG key, the data loader's position and the fp16
loss scale. Writes are atomic (orbax finalises a step directory only when
complete), so a crash mid-save never destroys the previous checkpoint.

A finished step directory also gets `jaxlm_files.json`, the size of every file
in it. Restoring checks those sizes first (a truncated or missing file, as after
a full disk or a partial copy, is found without reading any array), then lets
orbax read; a checkpoint that fails either way is reported in one line and the
next older one is used. Only when none is readable is it an error. A checkpoint
whose parameter tree differs from the model's (another configuration, or a
code change) is not corruption: it is an error naming the first differing
path, and nothing is skipped or moved.

Parameter paths change with the code (`LAYOUT`, recorded in every checkpoint's
metadata). A checkpoint of an older layout is read through `RENAMES`, so runs
written before a rename still generate, serve and resume; one of a newer
layout is refused with the version that reads it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxlm.data.tokenizer import DataError
from jaxlm.errors import ConfigError
from jaxlm.parallel.state import path_name

log = logging.getLogger(__name__)
MANIFEST = "jaxlm_files.json"

LAYOUT = 2  # the parameter paths this jaxlm writes
# From each older layout to the next: (regex, replacement) on slash-joined paths, applied in order to every
# item (parameters, adapters, optimizer moments), wherever the model's tree sits in it.
RENAMES = {
    1: (  # one layer stack for every model class (jaxlm before its model families, Nov 2026)
        (r"(^|/)(layers|final_norm|positions|embed_norm)/", r"\1stack/\2/"),
        (r"(^|/)(encoder|decoder)/(attn|attn_norm|mlp|mlp_norm|cross|cross_norm)/", r"\1\2/layers/\3/"),
        (r"(^|/)(encoder|decoder)_norm/", r"\1\2/final_norm/"),
        (r"(^|/)(encoder|decoder)_bias(/|$)", r"\1\2/relative_bias\3"),
    ),
}


def migrate_path(path: str, layout: int) -> str:
    """A parameter path written by `layout`, as this jaxlm names it."""
    for version in range(layout, LAYOUT):
        for pattern, replacement in RENAMES[version]:
            path = re.sub(pattern, replacement, path)
    return path


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint holds besides the arrays: everything an exact resume needs, for every loop."""

    step: int  # loop steps done: batches, or RL's rollout batches
    rng: list[int]  # the train state's PRNG key
    data: dict | None = None  # the data loader's position; None: imported weights, no data seen yet
    updates: int | None = None  # optimizer updates done, where a step is several (RL); None: one per step
    loss_scale: dict | None = None  # fp16's dynamic loss scale {"scale", "good_steps", "skipped"}; None: fresh
    base: str | None = None  # the model a PEFT checkpoint's adapters belong to (finetune.init_from)
    source: str | None = None  # imported weights: what they were converted from
    layout: int | None = LAYOUT  # the parameter paths' layout; None: written before layouts were recorded

    @property
    def optimizer_steps(self) -> int:
        return self.step if self.updates is None else self.updates

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, meta: dict, where: object = "checkpoint") -> CheckpointMeta:
        """Reads every layout jaxlm has written (convert's `from` is `source` now); DataError naming a field
        this version does not know (a newer jaxlm wrote it) or a missing one."""
        meta = dict(meta)
        if "from" in meta:
            meta["source"] = meta.pop("from")
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(meta) - known):
            raise DataError(f"{where}: metadata fields {unknown} are unknown to this jaxlm (written by a newer one?)")
        if missing := [k for k in ("step", "rng") if k not in meta]:
            raise DataError(f"{where}: metadata lacks {missing}")
        return cls(**{"layout": None, **meta})


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, params, opt_state, meta: CheckpointMeta, *, force: bool = False) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta.to_json()),
            ),
            force=force,
        )
        self._mngr.wait_until_finished()
        if jax.process_index() == 0:
            self._write_manifest(self.directory / str(step))

    @staticmethod
    def _write_manifest(step_dir: Path) -> None:
        files = {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*")) if p.is_file()}
        tmp = step_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(files, indent=0))
        tmp.replace(step_dir / MANIFEST)

    def check(self, step: int, items=("params", "opt_state", "meta")) -> str | None:
        """What is wrong with checkpoint `step`'s files (sizes against its manifest), or None."""
        step_dir = self.directory / str(step)
        for item in items:
            if not (step_dir / item).is_dir():
                return f"{item}/ is missing"
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            return None  # written before manifests existed: orbax's own checks decide
        try:
            files = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        for name, size in files.items():
            if name.split("/")[0] not in items and "/" in name:
                continue
            path = step_dir / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
        return None

    def restore(self, abstract_params, abstract_opt_state=None, step: int | None = None):
        """Returns (params, opt_state or None, CheckpointMeta) of `step`, by default of the newest readable one.

        An unreadable or incomplete checkpoint is skipped with one warning line (older ones are tried);
        DataError when none can be read.
        """
        steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
        if not steps:
            raise DataError(f"no checkpoint found in {self.directory}")
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        problems = []
        for s in steps:
            problem = self.check(s, tuple(items))
            layout = None
            if problem is None:
                problem, layout = self._layout(s, abstract_params)
            if problem is None:
                _silence_abandoned_reads()  # before the read: abandoned sibling reads may report at any time
                try:
                    if layout == LAYOUT:
                        out = self._mngr.restore(s, args=ocp.args.Composite(**items))
                    else:
                        out = self._restore_older(s, layout, abstract_params, abstract_opt_state)
                except ConfigError:
                    raise
                except Exception as e:  # orbax raises several types for missing/corrupt/mismatched files
                    problem = f"{type(e).__name__}: {_first_line(e)}"
                    gc.collect()  # most abandoned coroutines go now, under the hook
            if problem is not None:
                problems.append(f"{s} ({problem})")
                log.warning(
                    "checkpoint %s is unreadable or incomplete (%s): falling back to an older one",
                    self.directory / str(s),
                    problem,
                )
                continue
            meta = CheckpointMeta.from_json(out["meta"], self.directory / str(s))
            return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, meta
        raise DataError(f"no readable checkpoint in {self.directory}: " + "; ".join(problems))

    def _stored_tree(self, step: int, item: str):
        """The tree (shapes, dtypes) item `item` of checkpoint `step` holds, read from its metadata alone."""
        logging.getLogger("absl").addFilter(_drop_item_metadata_notice)  # idempotent
        stored = ocp.StandardCheckpointer().metadata(self.directory / str(step) / item)
        return getattr(stored, "item_metadata", stored)

    def _layout(self, step: int, abstract_params) -> tuple[str | None, int | None]:
        """(None, the layout to read checkpoint `step` as) if its parameters fit the model, directly or
        through RENAMES; (the problem, None) if its files cannot even be read (the caller falls back).
        ConfigError if it holds another model's parameters or a newer layout: nothing is skipped or moved."""
        where = self.directory / str(step)
        try:
            stored = self._stored_tree(step, "params")
            written = json.loads((where / "meta" / "metadata").read_text()).get("layout")
        except Exception as e:  # no or corrupt metadata: a damaged checkpoint
            return f"{type(e).__name__}: {_first_line(e)}", None
        if written is not None and written > LAYOUT:
            raise ConfigError(
                f"checkpoint {where} has parameter layout {written}, written by a newer jaxlm; this one reads "
                f"layouts 1 to {LAYOUT}: upgrade jaxlm (pip install -U jaxlm) to read it"
            )
        have, want = _shapes(stored), _shapes(abstract_params)
        difference = _difference(have, want)
        if difference is None:
            return None, LAYOUT
        for older in range(written or 1, LAYOUT):  # unrecorded: written before layout 2 or by it
            if _difference({migrate_path(p, older): v for p, v in have.items()}, want) is None:
                log.warning(
                    "checkpoint %s has parameter layout %d: its paths are renamed as it is read (new checkpoints "
                    "are written in layout %d)",
                    where,
                    older,
                    LAYOUT,
                )
                return None, older
        raise ConfigError(
            f"checkpoint {where} holds other parameters than this model: {difference}. It was written for "
            f"another model configuration (parameter layout {written or 'unrecorded'}; this jaxlm writes layout "
            f"{LAYOUT}); nothing was moved"
        )

    def _restore_older(self, step: int, layout: int, abstract_params, abstract_opt_state) -> dict:
        """Checkpoint `step` of an older layout: each item read as stored (onto this process's first device),
        its paths renamed, then placed as the model's abstract tree says (shardings included)."""
        device = jax.local_devices()[0]
        wanted = {"params": abstract_params}
        if abstract_opt_state is not None:
            wanted["opt_state"] = abstract_opt_state
        items = {"meta": ocp.args.JsonRestore()}
        for item in wanted:
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
                self._stored_tree(step, item),
            )
            items[item] = ocp.args.StandardRestore(target)
        out = dict(self._mngr.restore(step, args=ocp.args.Composite(**items)))
        for item, abstract_tree in wanted.items():
            stored = {migrate_path(path_name(p), layout): x for p, x in jax.tree_util.tree_leaves_with_path(out[item])}

            def place(path, leaf, item=item, stored=stored):
                name = path_name(path)
                if name not in stored:
                    raise ConfigError(f"checkpoint {self.directory / str(step)}: {item} lacks {name} (layout {layout})")
                x = stored[name]
                return jax.device_put(x.astype(leaf.dtype), getattr(leaf, "sharding", None))

            out[item] = jax.tree_util.tree_map_with_path(place, abstract_tree)
        return out

    def set_aside_after(self, step: int) -> list[Path]:
        """Moves the step directories newer than `step` (unreadable ones a resume skipped) to
        `checkpoints.unreadable/`, so training can write those steps again; nothing is deleted."""
        moved = []
        if jax.process_index() == 0:
            for s in self._mngr.all_steps():
                if s > step:
                    dest = self.directory.parent / f"{self.directory.name}.unreadable" / str(s)
                    n = 1
                    while dest.exists():
                        dest, n = dest.with_name(f"{s}.{n}"), n + 1
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.directory / str(s)), dest)
                    log.warning("moved unreadable checkpoint %s to %s", self.directory / str(s), dest)
                    moved.append(dest)
        return moved

    def reload(self) -> None:
        """Re-reads the step directories (after `set_aside_after`, on every process)."""
        self._mngr.reload()

    def close(self) -> None:
        self._mngr.close()


def _shapes(tree) -> dict[str, tuple]:
    return {path_name(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _difference(have: dict, want: dict) -> str | None:
    for path in sorted(have.keys() | want.keys()):
        if path not in want:
            return f"{path} is in the checkpoint, not in the model"
        if path not in have:
            return f"{path} is in the model, not in the checkpoint"
        if have[path] != want[path]:
            return f"{path} has shape {have[path]} in the checkpoint, {want[path]} in the model"
    return None


def _silence_abandoned_reads() -> None:
    """After a failed orbax read, its sibling reads are abandoned: their coroutines and callbacks later
    report 'Event loop is closed' as unraisable exceptions, from other threads, possibly while the failure is
    still being raised. That noise hides the one line that matters, so the filter goes in before any read."""
    if getattr(sys.unraisablehook, "_jaxlm", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        leftover = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value
        )
        name = getattr(getattr(unraisable.object, "cr_code", None), "co_name", "")
        if leftover or "read_array" in name or "_read" in name:
            return
        previous(unraisable)

    hook._jaxlm = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_abandoned_read_futures)  # "... exception was never retrieved"


def _drop_item_metadata_notice(record: logging.LogRecord) -> bool:
    """orbax looks for a step's _CHECKPOINT_METADATA in an item's directory too, and says it is not there."""
    message = record.getMessage()
    return not (message.startswith("Metadata file does not exist") and message.endswith("_CHECKPOINT_METADATA"))


def _drop_abandoned_read_futures(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    abandoned = "exception was never retrieved" in message and (
        "while reading array" in message or "Event loop is closed" in message
    )
    return not abandoned


def _first_line(e: Exception, limit: int = 200) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
