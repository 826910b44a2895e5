"""One training session: what every loop (pretraining, SFT, preference training, RL) shares, written once.

    with Session(cfg) as session:           # base, tokenizer, run-directory checks, config saved; nothing compiled
        session.build()                     # mesh, sharded steps and state, checkpointer
        session.restore(loader)             # the newest readable checkpoint (if any) into state and loader
        return session.run(step, evaluate)  # metrics, progress, evaluations, checkpoints, signals, wrap-up

A loop supplies only its batches and its step. `step(s)` advances `session.state` and returns the step's
record (device scalars are fetched in bulk every `train.log_every` steps); `evaluate(s, whole)` returns
held-out figures ({} when there are none this time), of the whole held-out split when `whole` (before the
first step and at the end) and of `train.eval_batches` batches in between.

SIGTERM and Ctrl-C finish the current step, save a checkpoint and return; running the same command again
resumes bit-for-bit: `CheckpointMeta` keeps the step, the optimizer updates, the PRNG key, the data position and
the fp16 loss scale, whichever loop wrote it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxlm.config import TEXT_OBJECTIVES, Config, ConfigError, load_config, save_config
from jaxlm.data.chat import CHATML, CHATML_TOKENS, read_template
from jaxlm.data.tokenizer import build_tokenizer, load_tokenizer
from jaxlm.parallel.mesh import check_layout, make_mesh
from jaxlm.parallel.state import to_host
from jaxlm.train.checkpoint import Checkpointer, CheckpointMeta, abstract
from jaxlm.train.data import load_splits, text_tokenizer, tokenizer_texts
from jaxlm.train.finetune import fit_head, grow_vocab, resolve
from jaxlm.train.run_dir import RunDir, check_resumable, load_base
from jaxlm.train.sharded import ShardedTraining

log = logging.getLogger(__name__)


class Session:
    """A run directory being trained: its config, base, tokenizer, data splits, sharded state and checkpoints.

    cfg: the run's config; the base's model shape and the tokenizer's vocabulary are resolved into
    `session.cfg` (Config checks that the alignment objectives name a base). step_config: the config of the
    compiled update, when a step is several (RL)."""

    def __init__(
        self,
        cfg: Config,
        *,
        step_config: Callable[[Config], Config] | None = None,
        progress: bool = True,
    ):
        tc = cfg.train
        self.run_dir = run = RunDir(tc.run_dir)
        self.lead = jax.process_index() == 0  # writes the run directory's files; every process writes its shards
        self.progress = progress and self.lead
        self.resuming = run.has_checkpoint()
        base = None
        if cfg.finetune.init_from:  # the base's weights, tokenizer and model shape
            base = load_base(cfg.finetune.init_from)
            cfg = resolve(cfg, base.model)
            log.info("%s from %s", tc.objective, base.source)
        self.cfg, self._step_config = cfg, step_config or (lambda c: c)
        if base is None:
            self._check_resumable(with_base=False)
        # A mesh that does not fit and missing data fail before the run directory is touched.
        check_layout(self._step_config(cfg), dict(make_mesh(cfg.mesh).shape))
        if cfg.train.objective in TEXT_OBJECTIVES:  # tokenizer first: the corpus is prepared with it
            tokenizer = _text_tokenizer(cfg, run, self.resuming, base)
            self.train_split, self.val_split = load_splits(cfg, tokenizer, progress=self.progress)
            if self.lead:
                run.path.mkdir(parents=True, exist_ok=True)
                if not self.resuming:
                    tokenizer.save(run.tokenizer)
            _barrier("tokenizer")
            self.tokenizer = _check_vocabulary(cfg, tokenizer, base)
        else:
            self.train_split, self.val_split = load_splits(cfg)
            if self.lead:
                run.path.mkdir(parents=True, exist_ok=True)
            self.tokenizer = _prepare_tokenizer(cfg, run, self.resuming, self.train_split, base)
        self.base_params = None
        if base is not None:
            self.cfg, params = grow_vocab(self.cfg, base.params, self.tokenizer.vocab_size)
            self.base_params = fit_head(self.cfg, params, base.model)
            if self.cfg.model.head != base.model.head:
                log.info("the base's read-out is dropped for a new %s head", self.cfg.model.head)
            self._check_resumable(with_base=True)  # against the model with the tokenizer's vocabulary
        if self.lead:
            save_config(self.cfg, run.config)
        self.sharded = self.state = self.ckpt = self.loader = None
        self.start = 0
        self._metrics = open(run.metrics, "a", encoding="utf-8") if self.lead else None
        self._pending: list[dict] = []  # step records not yet written: fetched in bulk, not one sync per step

    def _check_resumable(self, *, with_base: bool) -> None:
        run = self.run_dir
        if self.resuming and run.config.is_file():
            # At step 0 (e.g. imported weights) no data was seen yet: only the model must match.
            sections = ("model",) if run.latest_step() == 0 else ("model", "data")
            check_resumable(load_config(run.config), self.cfg, sections + (("peft",) if with_base else ()))

    # ------------------------------------------------------------------------------------------ state

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self, **sharded_options) -> ShardedTraining:
        """The sharded steps (of the update's config) and a fresh state, from the base where there is one, and
        the run's checkpointer. sharded_options: ShardedTraining's keywords."""
        self.sharded = ShardedTraining(self._step_config(self.cfg), **sharded_options)
        log.info("%s", self.sharded.describe())
        self.state = self.sharded.init_state(self.base_params)
        self.base_params = None  # the state holds them now, sharded
        self.ckpt = Checkpointer(self.run_dir.checkpoints, keep=self.cfg.train.keep_checkpoints)
        return self.sharded

    def restore(self, loader) -> int:
        """Restores the newest readable checkpoint, if any, onto this run's mesh (whatever mesh wrote it) and
        into `loader` (`state()`/`restore()`); newer unreadable ones are set aside. Returns the step to go on
        from (0 for a new run)."""
        self.loader = loader
        if not self.resuming:
            return self.start
        state, ckpt = self.state, self.ckpt
        params, opt_state, meta = ckpt.restore(abstract(state.params), abstract(state.opt_state))
        if ckpt.all_steps()[-1] > meta.step:  # newer ones were unreadable: keep them, out of the way
            ckpt.set_aside_after(meta.step)
            _barrier("set-aside")
            ckpt.reload()
        self.state = self.sharded.restore_state(
            state, params, opt_state, meta.optimizer_steps, meta.rng, meta.loss_scale
        )
        if meta.data is not None:  # None: imported weights, no data seen yet
            loader.restore(meta.data)
        self.start = meta.step
        log.info("resumed %s from step %d", self.run_dir.path, meta.step)
        return self.start

    def save(self, step: int) -> None:
        state = self.state
        scale = to_host(state.loss_scale)
        meta = CheckpointMeta(
            step=step,
            updates=int(state.step) if int(state.step) != step else None,
            rng=to_host(state.rng).tolist(),
            data=self.loader.state(),
            loss_scale={
                "scale": float(scale.scale),
                "good_steps": int(scale.good_steps),
                "skipped": int(scale.skipped),
            },
            base=self.cfg.finetune.init_from or None,  # a PEFT checkpoint holds adapters for this base
        )
        self.ckpt.save(step, state.params, state.opt_state, meta, force=True)

    # ------------------------------------------------------------------------------------------ metrics

    def write(self, record: dict) -> None:
        """One metrics.jsonl line, now (evaluations, skipped steps)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def _flush(self, tokens_per_s: float | None = None) -> dict | None:
        """Writes the pending step records (one device fetch for all); returns the last, on the host."""
        records = [{k: _plain(v) for k, v in r.items()} for r in to_host(self._pending)] if self._pending else []
        self._pending.clear()
        for r in records:
            self.write(r if tokens_per_s is None else {**r, "tokens_per_s": tokens_per_s})
        return records[-1] if records else None

    # ------------------------------------------------------------------------------------------ the loop

    def run(
        self,
        step: Callable[[int], dict],
        evaluate: Callable[[int, bool], dict],
        *,
        stop_after: int | None = None,
        evaluate_first: bool = False,
        tokens_per_step: int | None = None,
        show: tuple[str, ...] = ("loss",),
        describe: Callable[[dict], str] = str,
    ) -> dict:
        """Steps from the restored step to train.steps (or `stop_after`), then the wrap-up; returns the last step,
        the elapsed time, the signal that interrupted it (or None) and the final evaluation.

        evaluate_first: held-out figures before any update (at step 0), to compare with. tokens_per_step: adds
        tokens_per_s to the records. show: the record's figures on the progress bar."""
        tc = self.cfg.train
        start, end = self.start, min(tc.steps, stop_after) if stop_after is not None else tc.steps
        bar = _progress(self.progress, total=tc.steps, initial=start)
        last, t0 = {"time": time.perf_counter(), "step": start}, time.perf_counter()
        evaluation, interrupted, done = {}, None, start

        def held_out(s: int, whole: bool) -> dict:
            out = evaluate(s, whole)
            if out:
                self.write({"step": s, **out})
            return out

        if start == 0 and evaluate_first and (evaluation := held_out(0, True)):
            log.info("before training: %s", describe(evaluation))
        with _StopOnSignal() as stopper:
            for s in range(start + 1, end + 1):
                self._pending.append({"step": s, **step(s)})
                done = s
                bar.update(1)
                if s % tc.log_every == 0 or s == end:
                    now = time.perf_counter()
                    tps = (
                        (s - last["step"]) * tokens_per_step / max(now - last["time"], 1e-9)
                        if tokens_per_step
                        else None
                    )
                    last.update(time=now, step=s)
                    shown = self._flush(tps)
                    figures = {k: f"{shown[k]:.3f}" for k in show if isinstance(shown.get(k), float)}
                    bar.set_postfix(**figures, **({"tok_s": f"{tps:,.0f}"} if tps else {}))
                if tc.eval_every and s % tc.eval_every == 0 and s < tc.steps and (evaluation := held_out(s, False)):
                    bar.write(f"step {s}: {describe(evaluation)}")
                if tc.ckpt_every and s % tc.ckpt_every == 0:
                    self.save(s)
                if stopper.signum is not None:
                    interrupted = stopper.signum
                    break
        bar.close()
        self._flush()  # steps ended by a signal between log points
        if self.ckpt.latest_step() != done:
            self.save(done)
        if done >= tc.steps and interrupted is None:
            evaluation = held_out(done, True)
        self.close()
        return {"step": done, "elapsed_s": time.perf_counter() - t0, "interrupted": interrupted, **evaluation}

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def _plain(v):
    """A fetched figure as JSON: NumPy scalars become int, float, bool or str."""
    if isinstance(v, np.ndarray | np.generic):
        return {"i": int, "u": int, "b": bool, "f": float}.get(v.dtype.kind, str)(v.item())
    return v


class _StopOnSignal(contextlib.AbstractContextManager):
    """Records SIGTERM/SIGINT so the loop can checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _prepare_tokenizer(cfg: Config, run: RunDir, resuming: bool, train_split, base=None):
    if resuming:  # the checkpoint's token ids only mean something with its own tokenizer
        tokenizer = load_tokenizer(run.tokenizer)
    elif base is not None:  # fine-tuning: the base's tokenizer, and a chat template's tokens if it lacks them
        tokenizer = base.tokenizer
        chat = any(isinstance(e, dict) and ("messages" in e or isinstance(e.get("prompt"), list)) for e in train_split)
        if chat and read_template(cfg.data.chat_template, tokenizer) == CHATML:
            missing = [t for t in CHATML_TOKENS if getattr(tokenizer, "token_id", lambda t: None)(t) is None]
            if missing and not hasattr(tokenizer, "add_special_tokens"):
                raise ConfigError(
                    "the built-in chat template needs a BPE tokenizer (data.tokenizer=byte has no special tokens)"
                )
            if missing:
                tokenizer.add_special_tokens(missing)
        if jax.process_index() == 0:
            tokenizer.save(run.tokenizer)
        _barrier("tokenizer")
    elif jax.process_index() == 0:
        tokenizer = build_tokenizer(cfg.data.tokenizer, tokenizer_texts(train_split), cfg.model.vocab_size)
        tokenizer.save(run.tokenizer)
        _barrier("tokenizer")
    else:  # one process trains the tokenizer; the others read it from the shared run directory
        _barrier("tokenizer")
        tokenizer = load_tokenizer(run.tokenizer)
    return _check_vocabulary(cfg, tokenizer, base)


def _text_tokenizer(cfg: Config, run: RunDir, resuming: bool, base):
    """A text corpus's tokenizer: the checkpoint's (its ids only mean something with it), the base's, or a new
    one (`text_tokenizer`: trained once per corpus on a sample, cached)."""
    if resuming:
        return load_tokenizer(run.tokenizer)
    if base is not None:
        return base.tokenizer
    return text_tokenizer(cfg)


def _check_vocabulary(cfg: Config, tokenizer, base):
    if tokenizer.vocab_size > cfg.model.vocab_size and base is None:  # a base grows its vocabulary (grow_vocab)
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the {tokenizer.kind} "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    return tokenizer


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
