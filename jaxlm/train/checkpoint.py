"""Orbax checkpoints of a run: parameters, optimizer state and metadata as separate items.

`generate` and `eval` restore the parameters alone; training restores all.
Metadata (JSON) holds the step, the PRNG key and the data loader's position.
Writes are atomic (orbax finalises a step directory only when complete), so a
crash mid-save never destroys the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxlm.data.tokenizer import DataError


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> None:
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self._mngr.wait_until_finished()

    def restore(self, abstract_params, abstract_opt_state=None, step: int | None = None):
        """Returns (params, opt_state or None, meta) of `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise DataError(f"no checkpoint found in {self.directory}")
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises several types for missing/corrupt/mismatched files
            raise DataError(
                f"cannot restore checkpoint {self.directory / str(step)}: {type(e).__name__}: {e}"
            ) from None
        return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["meta"]

    def close(self) -> None:
        self._mngr.close()


def abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
