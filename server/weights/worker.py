"""Worker side of the weight update: Flywheel's backend in vLLM's weight-transfer factory.

This module is imported inside every vLLM worker process (it is the `--worker-extension-cls`),
which registers `FileWeightTransferEngine` under the backend name "flywheel" so that
`--weight-transfer-config '{"backend": "flywheel"}'` makes vLLM build it next to the model.

The API process drives it through vLLM's own engine-client calls (start_weight_update,
update_weights, finish_weight_update). One `update_weights` call carries the whole push, as the
list of safetensors files that the API process already validated. The engine
  1. opens every file and gets every tensor first: a file that cannot be read fails here, while
     the old weights are still untouched. safetensors maps the file, so this copies nothing
     (measured: 14 ms for the 538 MB of SmolLM2 in fp32);
  2. then loads them: on CPU and CUDA through `StagedApply` (apply.py: into staging tensors kept
     between pushes, then one re-pack (CPU) or copy (GPU) per layer; a failure while loading leaves
     the old weights whole), for what it does not know (quantized layers...), or with
     FLYWHEEL_WEIGHT_APPLY=layerwise, through vLLM's layerwise reload in
     place (model.load_weights on the checkpoint-format names, then the per-layer post-processing);
  3. re-ties a tied lm_head to the new embeddings, and on CPU re-packs fused-MoE expert weights, which
     the in-place reload leaves unpacked (outputs silently diverge otherwise: see shared/FIELD-NOTES.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

from flywheel.server.weights.apply import StagedApply
from flywheel.server.weights.protocol import BAD_VALUES, OLD_WEIGHTS_KEPT

BACKEND = "flywheel"
APPLY_ENV = "FLYWHEEL_WEIGHT_APPLY"  # "staged" (default) or "layerwise"; set by `flywheel serve`
logger = logging.getLogger("vllm.flywheel")


@dataclass
class FileInitInfo:
    """No rendezvous is needed: buckets are files named in each update."""


@dataclass
class FileUpdateInfo:
    files: list[str] = field(default_factory=list)


def reload_in_place(model: torch.nn.Module, model_config, tensors) -> None:
    """vLLM's layerwise in-place reload of checkpoint-format tensors, then Flywheel's fix-ups."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    initialize_layerwise_reload(model)
    model.load_weights(iter(tensors))
    finalize_layerwise_reload(model, model_config)
    after_reload(model, model_config)


def after_reload(model: torch.nn.Module, model_config) -> None:
    """What vLLM's reload leaves undone (see the module docstring)."""
    retie_lm_head(model, model_config.hf_config)
    repack_cpu_moe(model)


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Re-run the CPU fused-MoE pre-packing after an in-place reload. Returns the layers re-packed.

    vLLM runs `fused_experts.process_weights_after_loading` (pad + prepack into the grouped-gemm
    layout) only when the MoE kernel is first built; on a weight update it skips it, so the
    freshly loaded checkpoint-layout experts would be read as if packed.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a GPU build without the CPU kernels
        return 0
    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            count += 1
    return count


def retie_lm_head(model: torch.nn.Module, hf_config) -> bool:
    """Tie the output head to the new embeddings after a reload.

    The layerwise reload re-creates the embedding's parameter, but the tied lm_head loads no
    weights of its own, so vLLM puts its old kernel tensors back: it would keep serving the
    *old* embedding matrix (greedy text barely moves, logprobs do). Re-point it and re-run its
    post-processing (on CPU that re-packs the GEMM weight).
    """
    if not getattr(hf_config, "tie_word_embeddings", False):
        return False
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or lm_head is embed:
        return False
    lm_head.weight = embed.weight
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)
    return True


def non_finite(pairs) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf.

    Screened by each tensor's sum (a NaN or an Inf makes it non-finite; 0.02 s for 530 MB of fp32 on
    one core, where isfinite() took 0.29 s), with one sync for the whole push; only a tensor whose sum
    is not finite is checked exactly (a sum can also overflow with finite values)."""
    floats = [(name, t) for name, t in pairs if t.is_floating_point()]
    if not floats:
        return []
    sums = torch.stack([t.sum(dtype=torch.float32) for _, t in floats])
    if bool(sums.isfinite().all()):
        return []
    suspects = [i for i, ok in enumerate(sums.isfinite().tolist()) if not ok]
    return [floats[i][0] for i in suspects if not bool(torch.isfinite(floats[i][1]).all())]


def refuse_non_finite(pairs) -> None:
    """Raise, before the model is touched, when a push holds NaN or Inf (served, they give empty answers)."""
    bad = non_finite(pairs)
    if bad:
        raise ValueError(f"{OLD_WEIGHTS_KEPT}: {BAD_VALUES}: {len(bad)} tensor(s) hold NaN or Inf (first: {bad[0]!r})")


def read_files(files: list[str]) -> list[tuple[str, torch.Tensor]]:
    tensors = []
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors += [(name, f.get_tensor(name)) for name in f.keys()]
    return tensors


def receive_files(engine: WeightTransferEngine, files: list[str]) -> None:
    tensors = read_files(files)  # 1. every tensor before the model is touched
    refuse_non_finite(tensors)
    staged = staged_apply(engine)
    if staged is None:
        reload_in_place(engine.model, engine.model_config, tensors)  # 2. and 3.
    else:
        staged.apply(tensors)  # 2., faster on CPU (server/weights/apply.py); it ties lm_head itself
        repack_cpu_moe(engine.model)  # 3.


def staged_apply(engine: WeightTransferEngine) -> StagedApply | None:
    """The CPU fast path for this engine's model (built on the first push), or None for vLLM's reload."""
    if not hasattr(engine, "_flywheel_staged"):
        engine._flywheel_staged = None
        mode = os.environ.get(APPLY_ENV, "staged")
        why = StagedApply.supported(engine.model) if mode == "staged" else f"{APPLY_ENV}={mode}"
        if why is None:
            engine._flywheel_staged = StagedApply(engine.model)
        else:
            logger.info("flywheel: weight pushes use vLLM's layerwise reload (%s)", why)
    return engine._flywheel_staged


class FileWeightTransferEngine(WeightTransferEngine[FileInitInfo, FileUpdateInfo]):
    init_info_cls = FileInitInfo
    update_info_cls = FileUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: FileInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        pass  # the reload starts only once every tensor of the push has been read

    def finish_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict) -> None:
        # The base class calls torch.accelerator.synchronize(), which raises on CPU.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: FileUpdateInfo) -> None:
        receive_files(self, update_info.files)

    def shutdown(self) -> None:
        pass


class WeightUpdateExtension:
    """Mixed into vLLM's Worker class (`--worker-extension-cls`); importing it registers the backend."""

    def flywheel_weight_checksum(self) -> dict[str, float]:
        """Cheap fingerprint of the live weights (sum of each parameter), for tests and debugging."""
        model = self.model_runner.get_model()
        return {name: float(p.detach().float().sum()) for name, p in model.named_parameters()}


if BACKEND not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine(BACKEND, FileWeightTransferEngine)
# vLLM's GPU engines plus Flywheel's bucket path and fix-ups; imported only when a server selects them
for _name, _cls in (("flywheel_nccl", "FlywheelNCCLEngine"), ("flywheel_ipc", "FlywheelIPCEngine")):
    if _name not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(_name, "flywheel.server.weights.worker_gpu", _cls)
