"""One trainer for pre-training and supervised fine-tuning.

The data objects are anything with `get_batch(step, micro_step=0) -> {"input_ids", "targets",
"doc_ids"}` (targets = -100 where no loss), a pure function of its arguments: a resumed run sees
exactly the batches an uninterrupted one would. Each micro-batch also seeds the routing noise from
(seed, step, micro_step), so resuming is exact without replaying any random stream.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from polyglu import hardware
from polyglu.atomic import atomic_directory
from polyglu.data.special_tokens import IGNORE_INDEX
from polyglu.model.compiler import compile_module
from polyglu.model_io import CheckpointError, load_state_file, save_model, write_model_dir
from polyglu.train import checkpointing as ckpt
from polyglu.train import rundir
from polyglu.train.config import RunConfig
from polyglu.train.distributed import DistributedContext
from polyglu.train.loss import chunked_cross_entropy_sum, cross_entropy_sum
from polyglu.train.metrics import MetricsWriter, routing_entropy_summary, truncate_metrics
from polyglu.train.optim import build_optimizer
from polyglu.train.schedules import lr_at, tau_at


class BatchSource(Protocol):
    def get_batch(self, step: int, micro_step: int = 0) -> dict[str, torch.Tensor]: ...


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the last good checkpoint is intact."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) or SIGTERM: the step in progress finished, a checkpoint was saved, the run
    stopped. `signal` names the signal (the CLI exits 128 + its number, as the signal would)."""

    def __init__(self, step: int, checkpoint: Path | None, signal: str = "SIGINT") -> None:
        super().__init__(f"interrupted ({signal}) at step {step}; checkpoint saved: {checkpoint}")
        self.step, self.checkpoint, self.signal = step, checkpoint, signal


class LossModule(nn.Module):
    """model + cross-entropy through the head in one forward, so DDP/FSDP wrap the whole computation.
    The loss kernel (chunked, or the fused one on CUDA) is `polyglu.train.loss.cross_entropy_sum`'s choice."""

    def __init__(self, model: nn.Module, chunk_size: int, loss_kernel: str = "auto",
                 vocab_multiple: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.loss_kernel, self.vocab_multiple = loss_kernel, vocab_multiple

    def forward(self, input_ids, doc_ids, targets):
        out = self.model(input_ids, doc_ids, compute_logits=False)
        return cross_entropy_sum(out.hidden_states, self.model.lm_head.weight, targets, self.chunk_size,
                                 self.loss_kernel, self.vocab_multiple)


def micro_seed(seed: int, step: int, micro_step: int, rank: int = 0) -> int:
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 101 + rank) % (2**63 - 1)


class Trainer:
    def __init__(self, config: RunConfig, model: nn.Module, train_data: BatchSource,
                 val_data: BatchSource | None = None, tokenizer_dir: str | Path | None = None,
                 dist: DistributedContext | None = None, log=print, overwrite: bool = False,
                 run_lock: rundir.RunLock | None = None) -> None:
        """`overwrite`: a run directory holding another run's results is cleared when fit() starts
        (without it, and without resume(), fit() refuses to start there). `run_lock`: the run
        directory's lock when the caller took it already (build_run, before writing data)."""
        self.config = config
        self.tc = config.train
        self.run_dir = Path(config.run_dir)
        self.dist = dist or DistributedContext.from_env()
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.train_data, self.val_data = train_data, val_data
        self.tokenizer_dir = tokenizer_dir
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        # precision and threads by what this machine computes fast (polyglu.hardware): one line, recorded
        self.threads = hardware.apply_threads(self.tc.threads)
        self.precision = hardware.choose_precision(self.tc.dtype, self.device)
        self.autocast_dtype = torch.bfloat16 if self.precision.name == "bfloat16" else None
        self.log(f"{self.precision.describe()}; {self.threads.describe()}")
        self.grad_accum = self._grad_accum()
        if hasattr(train_data, "grad_accum_steps"):  # sources that index rows by (step, micro_step)
            train_data.grad_accum_steps = self.grad_accum
        self.optimizer = build_optimizer(self.model, self.tc.lr, self.tc.weight_decay, tuple(self.tc.betas),
                                         self.tc.eps)
        self.step = 0
        self.tokens = 0
        self.best_val: float | None = None
        self.bad_steps = 0
        self.skipped_steps = 0
        self.overwrite = overwrite
        self.run_lock = run_lock or rundir.RunLock(self.run_dir)
        self.resumed_step: int | None = None  # set by resume(): continue this run directory's run
        self.config_changes: dict[str, tuple[Any, Any]] = {}  # safe changes against the resumed run
        self._started = False
        self._saved_step: int | None = None
        self._saved_at = time.monotonic()  # timed checkpoints count from here, then from each save
        self._interrupt_requested = False
        self._device_counters: dict[str, torch.Tensor] | None = None  # see _step_on_device
        self.loss_module = self.dist.wrap(self._prepare_model(), self.tc.distributed)
        self.sharded = self.dist.is_sharded(self.loss_module)
        if self.sharded:  # fully_shard replaced the parameters with DTensors: optimise those
            self.optimizer = build_optimizer(self.model, self.tc.lr, self.tc.weight_decay, tuple(self.tc.betas),
                                             self.tc.eps)

    # ---- set-up

    def _grad_accum(self) -> int:
        if self.tc.tokens_per_step is None:
            return self.tc.grad_accum
        per_micro = self.tc.batch_size * self.config.data.seq_len * self.dist.world_size
        return max(1, round(self.tc.tokens_per_step / per_micro))

    def _prepare_model(self) -> nn.Module:
        if self.tc.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for i, block in enumerate(self.model.layers):
                self.model.layers[i] = checkpoint_wrapper(block)
        if self.tc.compile:
            for block in self.model.layers:
                compile_module(block)
        return LossModule(self.model, self.tc.loss_chunk_size, self.tc.loss_kernel,
                          self.tc.vocab_pad_multiple).to(self.device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- state

    def batch_layout(self) -> dict[str, int]:
        return {"world_size": self.dist.world_size, "batch_size": self.tc.batch_size, "grad_accum": self.grad_accum}

    def train_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "tau": self.model.tau, "best_val_loss": self.best_val,
                "skipped_steps": self.skipped_steps, "data": {"next_step": self.step},
                "rng": ckpt.rng_state(), "config": self.config.to_dict(), "batch_layout": self.batch_layout()}

    def save(self) -> Path | None:
        self.read_step_counters()  # train_state records skipped_steps
        self._saved_step = self.step
        self._saved_at = time.monotonic()
        if self.sharded:  # collective: DCP shards from every rank + the full model dir from rank 0
            return ckpt.save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer,
                                                self.train_state(), self.dist, self.tokenizer_dir,
                                                keep=self.tc.keep_checkpoints)
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.train_state(),
                                        self.tokenizer_dir, keep=self.tc.keep_checkpoints)
        self.dist.barrier()
        return path

    def claim_run_dir(self) -> None:
        """Hold the run directory's lock (rank 0; RunDirError on every rank when another trainer
        holds it)."""
        rundir.on_main(self.dist, lambda: self.run_lock.acquire(self.log))

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue the run in the run directory from `path` or its latest complete checkpoint
        (from scratch when it has none). The saved config is compared with this one first: a change
        that alters the run's results raises RunDirError listing each key, before any tensor loads."""
        self.claim_run_dir()
        try:
            return self._resume(path)
        except BaseException:
            self.run_lock.release()  # refused or failed: the run directory is free again
            raise

    def _resume(self, path: str | Path | None) -> bool:
        path = Path(path) if path else ckpt.newest_intact_checkpoint(self.run_dir, self.log)
        if path is None:
            saved = rundir.read_run_config(self.run_dir)
            if saved is not None:  # a run killed before its first checkpoint: the same run again
                self.config_changes = rundir.check_resume_config(
                    saved, self.config.to_dict(), self.run_dir, str(self.run_dir / rundir.RUN_CONFIG_NAME))
            self.resumed_step = 0
            self.log(f"no checkpoint in {self.run_dir}/checkpoints; starting from scratch")
            return False
        train_state = ckpt.read_train_state(path)
        if train_state.get("config") is not None:
            self.config_changes = rundir.check_resume_config(
                train_state["config"], self.config.to_dict(), self.run_dir, f"checkpoint {path}", checkpoint=path,
                old_layout=train_state.get("batch_layout"), new_layout=self.batch_layout())
        if ckpt.is_sharded_checkpoint(path):  # DCP (saved under FSDP): loads at any world size
            ckpt.load_sharded_checkpoint(path, self.model, self.optimizer)
        elif self.sharded:
            raise CheckpointError(
                f"{path}: a single-process/DDP checkpoint (no {ckpt.DCP_DIR}/); an FSDP run resumes only from "
                f"checkpoints saved under FSDP. Start a new FSDP run from its weights instead, or resume "
                f"it without train.distributed=fsdp")
        else:
            state = load_state_file(path / "model.safetensors")
            self.model.load_state_dict(state, strict=False)
            tensors, meta, train_state = ckpt.read_checkpoint(path)
            ckpt.load_optimizer(self.optimizer, {k: v.to(self.device) for k, v in tensors.items()}, meta)
        self.step = self.resumed_step = int(train_state["step"])
        self.tokens = int(train_state["tokens"])
        self.best_val = train_state.get("best_val_loss")
        self.skipped_steps = int(train_state.get("skipped_steps", 0))
        if train_state.get("tau") is not None:
            self.model.set_tau(train_state["tau"])
        ckpt.set_rng_state(train_state["rng"])
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # ---- schedules

    def lr(self, step: int) -> float:
        return lr_at(step, self.tc.lr, self.tc.warmup_steps, self.tc.max_steps, self.tc.min_lr_ratio,
                     self.tc.lr_schedule)

    def tau(self, step: int) -> float | None:
        if self.tc.freeze_tau or not self.model.polyglu_layers():  # (model.tau would read the buffer: a sync)
            return None
        return tau_at(step, self.tc.tau_start, self.tc.tau_end, self.tc.max_steps, self.tc.tau_schedule)

    # ---- one step

    def train_step(self) -> dict[str, float]:
        step = self.step
        lr = self.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tau = self.tau(step)
        if tau is not None:
            self.model.set_tau(tau)
        self.model.train()
        batches = [self.train_data.get_batch(step, micro) for micro in range(self.grad_accum)]
        n_targets = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in batches)
        if self.dist.enabled:  # summed over ranks on the device: no host read in the step
            n_targets = self.dist.all_reduce_sum(torch.tensor(float(n_targets), dtype=torch.float64,
                                                              device=self.device)).clamp(min=1)
        else:
            n_targets = max(1, n_targets)
        loss_sum = None  # on the device: reading the loss (a host sync) waits for log_every
        for micro, batch in enumerate(batches):
            torch.manual_seed(micro_seed(self.tc.seed, step, micro, self.dist.rank))
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = micro == len(batches) - 1
            with self.dist.no_sync(self.loss_module, enabled=not last), self._autocast():
                loss = self.loss_module(batch["input_ids"], batch["doc_ids"], batch["targets"])
                # normalised by the global token count: ranks' gradients average to the global mean
                scale = self.dist.world_size / n_targets
                (loss * (scale.float() if isinstance(scale, torch.Tensor) else scale)).backward()
            loss_sum = loss.detach().double() if loss_sum is None else loss_sum + loss.detach().double()
        loss_mean = self.dist.all_reduce_sum(loss_sum) / n_targets
        grad_norm = self.dist.clip_grad_norm(self.model.parameters(), self.tc.grad_clip)  # global, also sharded
        tokens = sum(int(b["input_ids"].numel()) for b in batches) * self.dist.world_size
        if self._skips_on_device:
            return self._step_on_device(step, lr, tau, loss_mean, grad_norm, tokens)
        loss_value, grad_norm = float(loss_mean), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= self.tc.max_bad_steps:
                last = ckpt.latest_checkpoint(self.run_dir)
                raise TrainingError(
                    f"{self.bad_steps} consecutive non-finite steps (loss={loss_value}, grad_norm={grad_norm}) "
                    f"at step {step}; stopping. Last good checkpoint: {last or 'none'}")
        else:
            self.bad_steps = 0
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.tokens += tokens
        self.step += 1
        return {"loss": loss_value, "lr": lr, "tau": tau if tau is not None else self.model.tau,
                "grad_norm": grad_norm, "step_tokens": tokens, "skipped": not math.isfinite(grad_norm)}

    @property
    def _skips_on_device(self) -> bool:
        """A fused AdamW on an accelerator skips a non-finite step inside its own kernel (`found_inf`,
        as under GradScaler): the step needs no host read. On the CPU, where reading a value costs
        nothing (the optimizer is fused there too), the finiteness is read every step."""
        return bool(self.optimizer.defaults.get("fused")) and self.device.type != "cpu"

    def _step_on_device(self, step: int, lr: float, tau: float | None, loss: torch.Tensor, grad_norm: torch.Tensor,
                        tokens: int) -> dict[str, Any]:
        """The rest of `train_step` without a host sync: the optimizer leaves the weights and its state
        untouched when the loss or the norm is not finite; the run of consecutive skipped steps and the
        skip count stay on the device until `read_step_counters` (log_every, checkpoints)."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._device_counters is None:  # a run of skipped steps goes on across reads
            run = torch.tensor(self.bad_steps, dtype=torch.long, device=finite.device)
            self._device_counters = {"run": run, "worst_run": run, "skipped": torch.zeros_like(run)}
        counters = self._device_counters
        counters["run"] = torch.where(finite, 0, counters["run"] + 1)
        counters["worst_run"] = torch.maximum(counters["worst_run"], counters["run"])
        counters["skipped"] = counters["skipped"] + (~finite).long()
        self.tokens += tokens
        self.step += 1
        return {"loss": loss, "lr": lr, "tau": tau, "grad_norm": grad_norm, "step_tokens": tokens,
                "skipped": ~finite}  # tau None: frozen, read from the model at log_every

    def read_step_counters(self) -> None:
        """Bring the device-side skip counters to the host (one sync): `skipped_steps`, `bad_steps`; raise
        TrainingError when some run of consecutive non-finite steps since the last read reached
        max_bad_steps (the weights were never updated by those steps)."""
        counters, self._device_counters = self._device_counters, None
        if counters is None:
            return
        run, worst, skipped = (int(v) for v in torch.stack(list(counters.values())).tolist())
        self.skipped_steps += skipped
        self.bad_steps = run
        if worst >= self.tc.max_bad_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingError(f"{worst} consecutive non-finite steps before step {self.step}; stopping. "
                                f"Last good checkpoint: {last or 'none'}")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_data is None:
            return None
        self.model.eval()
        total, count = 0.0, 0
        with self.dist.full_parameters(self.loss_module):  # FSDP: the inner model is called directly
            for i in range(self.tc.eval_batches):
                batch = {k: v.to(self.device) for k, v in self.val_data.get_batch(i).items()}
                with self._autocast():
                    out = self.model(batch["input_ids"], batch["doc_ids"], compute_logits=False)
                    total += float(chunked_cross_entropy_sum(out.hidden_states, self.model.lm_head.weight,
                                                             batch["targets"], self.tc.loss_chunk_size))
                count += int((batch["targets"] != IGNORE_INDEX).sum())
        total = self.dist.all_reduce_sum(total)
        count = self.dist.all_reduce_sum(float(count))
        self.model.train()
        return total / max(count, 1)

    # ---- the loop

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps` (or stop early at `stop_at`, schedules unchanged), holding the
        run directory's lock. Without resume(), a run directory holding another run's results is
        refused (RunDirError) unless `overwrite`. Ctrl-C finishes the step, saves a checkpoint and
        raises TrainingInterrupted."""
        self.claim_run_dir()
        self._interrupt_requested = False
        previous_handlers = self._catch_sigint()
        try:
            rundir.on_main(self.dist, self._prepare_run_dir)
            self.dist.barrier()  # no rank writes before rank 0 cleared or truncated old results
            self._started = True
            return self._train(stop_at)
        finally:
            for signum, handler in (previous_handlers or {}).items():
                signal.signal(signum, handler)
            self.run_lock.release()

    def _prepare_run_dir(self) -> None:
        """Rank 0, lock held: refuse or clear another run's results (fresh start), or drop the
        metrics rows after the resumed step (resume); clean what killed trainers left; record the
        config."""
        if self._started:  # fit() again on this trainer: the same run goes on
            truncate_metrics(self.run_dir, self.step)
            return
        found = []
        if self.resumed_step is None:
            found = rundir.refuse_existing_results(self.run_dir, self.overwrite)
        rundir.clean_leftovers(self.run_dir, self.log)
        if found:
            rundir.clear_results(self.run_dir, self.log)
        if self.resumed_step is not None:
            dropped = truncate_metrics(self.run_dir, self.step)
            if dropped:
                self.log(f"{self.run_dir / 'metrics.jsonl'}: dropped {dropped} rows logged after step {self.step} "
                         f"(those steps are trained again)")
        if self.config_changes:
            self.log(f"resuming with changed settings: {rundir.format_changes(self.config_changes)} "
                     f"(recorded in {self.run_dir / rundir.HISTORY_NAME})")
        event = "resume" if self.resumed_step is not None else ("overwrite" if found else "start")
        rundir.record_start(self.run_dir, self.config.to_dict(), event, self.step, self.config_changes,
                            environment=hardware.run_record(self.precision, self.threads, self.device))

    def _catch_sigint(self):
        """Ctrl-C (SIGINT) or SIGTERM (what SLURM and Kubernetes send before killing) asks the loop
        to checkpoint and stop after the current step; a second one stops at once. Returns the
        previous handlers (None off the main thread, where signals can't be set)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            self.stop_signal = signal.Signals(signum).name
            if self.step + 1 >= self.tc.max_steps:  # the last step: the run finishes and saves as usual
                self.log(f"{self.stop_signal} during the last step: finishing the run (send it again to stop "
                         f"at once without saving)")
            else:
                self.log(f"{self.stop_signal}: saving a checkpoint after step {self.step + 1} and stopping "
                         f"(send it again to stop at once without saving)")

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            previous[signum] = handler if handler is not None else (
                signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.signal(signum, request_stop)
        return previous

    def _checkpoint_due(self, step: int) -> bool:
        """Every `checkpoint_every` steps, and when `checkpoint_minutes` passed since the last save (or
        the start). Distributed ranks decide the timed save together, at logged steps only (one
        collective there), so that every rank saves at the same step."""
        if step % self.tc.checkpoint_every == 0:
            return True
        if self.tc.checkpoint_minutes is None:
            return False
        due = time.monotonic() - self._saved_at >= 60 * self.tc.checkpoint_minutes
        if self.dist.enabled:
            return step % self.tc.log_every == 0 and self.dist.all_reduce_sum(float(due)) > 0
        return due

    def _stop_requested(self) -> bool:
        # every rank must stop at the same step (the checkpoint is collective under FSDP)
        if self.dist.enabled:
            return self.dist.all_reduce_sum(float(self._interrupt_requested)) > 0
        return self._interrupt_requested

    def _train(self, stop_at: int | None) -> dict[str, Any]:
        tc = self.tc
        end = tc.max_steps if stop_at is None else min(stop_at, tc.max_steps)
        metrics = MetricsWriter(self.run_dir, enabled=self.dist.is_main, tensorboard=tc.tensorboard,
                                wandb_project=tc.wandb_project, config=self.config.to_dict())
        bar = self._progress_bar()
        window_tokens, window_start = 0, time.perf_counter()
        last_row: dict[str, Any] = {}
        try:
            while self.step < end:
                out = self.train_step()
                window_tokens += out["step_tokens"]
                step = self.step
                if step % tc.log_every == 0 or step == tc.max_steps:
                    row = self._log_row(out, window_tokens, window_start)
                    metrics.write(row)
                    last_row = row
                    window_tokens, window_start = 0, time.perf_counter()
                    self._show_row(row, bar)
                if bar is not None:
                    bar.update(1)
                if self._checkpoint_due(step) and step != tc.max_steps:
                    self.save()
                if self._stop_requested() and step < end:
                    path = self.save() if self._saved_step != step else ckpt.latest_checkpoint(self.run_dir)
                    raise TrainingInterrupted(step, path, getattr(self, "stop_signal", "SIGINT"))
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
        path = self.save()
        self._export_final()
        return {"step": self.step, "tokens": self.tokens, "last": last_row, "best_val_loss": self.best_val,
                "checkpoint": str(path) if path else None, "model_dir": str(self.run_dir / "final")}

    def _progress_bar(self):
        """The training's tqdm bar (rank 0 with `train.progress`; tqdm hides it off a terminal), or None."""
        if not (self.tc.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.tc.max_steps, initial=self.step, desc=f"{self.config.task}", unit="step",
                    file=sys.stderr, dynamic_ncols=True, disable=None)

    def _log_row(self, out: dict[str, Any], window_tokens: int, window_start: float) -> dict[str, Any]:
        """The metrics row of a logged step: its loss, norm and speed over the window since the last
        logged step, with the routing entropy and the validation loss on the steps they are due."""
        tc, step = self.tc, self.step
        # the one host read of the step's loss and norm (kept on the device until now)
        self.read_step_counters()
        out.update(loss=float(out["loss"]), grad_norm=float(out["grad_norm"]),
                   tau=out["tau"] if out["tau"] is not None else self.model.tau)
        elapsed = time.perf_counter() - window_start
        row = {"step": step, "tokens": self.tokens, "loss": out["loss"], "lr": out["lr"],
               "tau": out["tau"], "grad_norm": out["grad_norm"],
               "tokens_per_s": window_tokens / max(elapsed, 1e-9), "skipped_steps": self.skipped_steps}
        if step % tc.routing_stats_every == 0 or step == tc.max_steps:
            with self.dist.full_parameters(self.loss_module):  # direct calls of the inner model
                stats = routing_entropy_summary(self.model, self.train_data.get_batch(step, 0),
                                                self.device, self._autocast)
            if stats:
                row["routing_entropy"] = stats
        if step % tc.eval_every == 0 or step == tc.max_steps:
            val = self.evaluate()
            if val is not None:
                row["val_loss"] = val
                self.best_val = val if self.best_val is None else min(self.best_val, val)
        return row

    def _show_row(self, row: dict[str, Any], bar) -> None:
        """A logged step on the progress bar, or, with no bar on a terminal, as one plain line."""
        tau = row["tau"]
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                            tau=f"{tau:.3f}" if tau is not None else "-",
                            tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if bar is None or bar.disable:  # no terminal: one plain line per logged step
            val = f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
            tau_text = f" tau {tau:.3f}" if tau is not None else ""
            self.log(f"step {row['step']}/{self.tc.max_steps} loss {row['loss']:.4f}{val} lr {row['lr']:.2e}"
                     f"{tau_text} {row['tokens_per_s']:.0f} tok/s")

    def _export_final(self) -> None:
        """run_dir/final: the plain model directory (weights, config, tokenizer) for generate/eval,
        written in a temporary directory and swapped in whole. Called on every rank: under FSDP the
        full weights are gathered (collective) to rank 0."""
        import shutil

        extra = {"step": self.step, "tokens": self.tokens, "task": self.config.task}
        state = ckpt.full_model_state(self.model) if self.sharded else None
        if not self.dist.is_main:
            return
        with atomic_directory(self.run_dir / "final") as tmp:
            if state is not None:
                write_model_dir(state, self.model.config, tmp, extra=extra)
            else:
                save_model(self.model, tmp, extra=extra)
            if self.tokenizer_dir is not None and Path(self.tokenizer_dir).is_dir():
                shutil.copytree(self.tokenizer_dir, tmp / "tokenizer")
