"""Pipeline parallelism for MegatronPolicy through megatron-core's own 1F1B schedule.

The recipe (trainer/objectives.py) works per micro-batch: logprobs = policy.forward_logprobs(...),
loss = f(logprobs), loss.backward(). Under PP a stage cannot backward on its own: the gradient of its
output comes from the next stage. So the policy splits the work in two, both through
`megatron.core.pipeline_parallel.get_forward_backward_func()`:

  1. forward_logprobs: a forward-only pipeline pass; the last stage turns logits into log-probs and
     broadcasts them to every stage, which hands the recipe a leaf tensor `proxy` (requires_grad).
     The recipe's loss.backward() then leaves g = dloss/dlogprobs in proxy.grad, on every rank.
  2. finalize_grads: one forward+backward schedule over the step's recorded micro-batches with the
     surrogate loss sum(logprobs * g) on the last stage: its gradient w.r.t. every weight is exactly
     the recipe's (chain rule through the fixed vector g), whatever the objective.
The price is one extra forward per micro-batch; objectives stay backend-agnostic.

On CPU (gloo) PP needs three adjustments, applied here without editing megatron (`apply_cpu_patches`
before the model is built, `prepare_schedule` after):
  * GPTModel's constructor moves the last stage's copy of a tied embedding to .cuda() before
    all-reducing it across the first/last stage; on CPU the all-reduce runs in place;
  * the schedule allocates its token counter with device="cuda" (a literal, not current_device());
  * batched p2p (batch_isend_irecv + torch.cuda.synchronize) becomes plain isend/irecv.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

_PATCHED: set[str] = set()


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    temperature: float
    grad: torch.Tensor | None = None  # dloss/dlogprobs [B, T] (backward pass only)


def _cpu_schedule_module() -> None:
    """Give megatron's schedules module a `torch` whose zeros(device="cuda") lands on the CPU."""
    if "schedules" in _PATCHED:
        return
    from megatron.core.pipeline_parallel import schedules

    real = torch

    def zeros(*args, device=None, **kwargs):
        return real.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    shim = types.ModuleType("torch_on_cpu")
    shim.__getattr__ = lambda name: getattr(real, name)  # type: ignore[method-assign]
    shim.zeros = zeros
    schedules.torch = shim
    _PATCHED.add("schedules")


def _cpu_tied_embedding_setup() -> None:
    if "embedding" in _PATCHED:
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup(self) -> None:
        in_group = self._is_in_embd_group()
        self._is_in_embd_group = lambda: False  # skip megatron's weight.data.cuda() + all-reduce ...
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if in_group and dist.is_initialized():  # ... and do the all-reduce on the CPU tensor
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    LanguageModule.setup_embeddings_and_output_layer = setup
    _PATCHED.add("embedding")


def apply_cpu_patches() -> None:
    """What megatron's pipeline code needs on a machine without CUDA (idempotent; no-op with CUDA)."""
    if torch.cuda.is_available():
        return
    _cpu_tied_embedding_setup()
    _cpu_schedule_module()


def prepare_schedule(model) -> None:
    """Per-model settings the schedule reads at run time (and the CPU shims)."""
    config = model.config
    config.variable_seq_lengths = False  # every call runs micro-batches of one shape (see run_schedule)
    if not torch.cuda.is_available():
        apply_cpu_patches()
        config.batch_p2p_comm = False  # gloo: plain isend/irecv, no CUDA synchronize


class PipelineRunner:
    """Runs forward-only and forward+backward pipeline passes of one GPTModel stage."""

    def __init__(self, model, logprobs_fn, mask_fn):
        self.model = model
        self.logprobs_fn = logprobs_fn  # (logits, targets, temperature) -> [B, T] float32
        self.mask_fn = mask_fn  # position_ids -> attention mask or None
        prepare_schedule(model)

    def _step_func(self, num_microbatches: int, backward: bool):
        def forward_step(data_iterator, model):
            mb: MicroBatch = next(data_iterator)
            output = model(mb.input_ids, mb.position_ids, self.mask_fn(mb.position_ids))

            def loss_func(logits):  # last stage only
                lp = self.logprobs_fn(logits, mb.targets, mb.temperature)
                if not backward:
                    return lp.sum() * 0.0, {"logprobs": lp.detach()}
                # the schedule divides the loss by num_microbatches; undo it so d/dlp = g exactly
                return (lp * mb.grad).sum() * num_microbatches, {}

            return output, loss_func

        return forward_step

    def _run(self, batches: list[MicroBatch], backward: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        b, t = batches[0].input_ids.shape
        func = self._step_func(len(batches), backward)
        return get_forward_backward_func()(
            forward_step_func=func,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=t,
            micro_batch_size=b,
            forward_only=not backward,
        )

    def logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """Forward-only pass; every stage gets the last stage's log-probs [B, T]."""
        from megatron.core import parallel_state as ps

        with torch.no_grad():
            out = self._run([batch], backward=False)
        if ps.is_pipeline_last_stage():
            lp = out[0]["logprobs"].float().contiguous()
        else:
            lp = torch.empty(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
        dist.broadcast(lp, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return lp

    def backward(self, batches: list[MicroBatch]) -> None:
        """Accumulate the weight gradients of sum(logprobs * grad) over `batches` into param.grad.

        Consecutive micro-batches of one shape share one 1F1B schedule (p2p buffers have one shape).
        """
        start = 0
        while start < len(batches):
            shape = batches[start].input_ids.shape
            end = start
            while end < len(batches) and batches[end].input_ids.shape == shape:
                end += 1
            self._run(batches[start:end], backward=True)
            start = end
