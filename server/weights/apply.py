"""Applying a push on CPU: load into staging tensors, then re-pack each layer once.

vLLM's layerwise reload (what `reload_in_place` in worker.py uses, and what GPUs keep using)
is general but slow on CPU, where a served linear layer keeps no weight tensor at all: only a
oneDNN (or sgl) handle holding a packed copy. For every layer it restores the parameters on the
meta device, runs each weight loader twice (once on meta under a counting dispatch mode, once
for real), allocates fresh memory for the layer, copies, re-packs, copies back. Measured on
SmolLM2-135M in one worker thread: 0.75 s, of which the re-pack is 0.33 s.

`StagedApply` keeps that model of a layer (vLLM's own recorded metadata, its weight loaders, its
`process_weights_after_loading`, its copy back into the live tensors) and drops the rest:
  1. staging: every layer that holds loadable parameters gets staging parameters built once
     from vLLM's recorded metadata and kept between pushes (memory already faulted in: a copy
     into it runs at memory speed, a fresh allocation costs several times more here);
  2. `model.load_weights` writes the push into the staging tensors, each loader run once. The
     live layers are not touched yet: if loading fails, the live tensors go back and the old
     weights keep serving;
  3. each layer that was loaded is post-processed (on CPU: its GEMM handle is re-packed from the
     staging weight) and its results are copied into the live tensors, which go back in place.
     A tied lm_head shares the embedding's new handle instead of packing the same matrix again.
On a CUDA GPU the same path holds: the known methods' post-processing is a no-op there for
unquantized layers, so a push is one loader run into the staging tensors plus one device copy per
tensor into the live ones (whose addresses CUDA graphs captured: they stay where they are). The cost is
one extra copy of the weights in GPU memory, outside vLLM's `gpu_memory_utilization` budget, allocated
at the first push; `weight_apply: layerwise` (FLYWHEEL_WEIGHT_APPLY) goes back to vLLM's reload.
Anything this module does not recognise (a quantized layer, an attention layer with weights to load,
parameters on several devices) is left to vLLM's layerwise reload: `supported(model)` says which.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.attention import is_deferred_attention_layer
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
from vllm.model_executor.model_loader.reload.meta import SKIP_MODULES, SKIP_TENSORS, materialize_meta_tensor
from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from flywheel.server.weights.protocol import OLD_WEIGHTS_KEPT

# post-processing this module knows to be a pure function of the loaded weights
KNOWN_METHODS = (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)


def _moe_methods() -> tuple:
    try:
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    except ImportError:
        return ()
    return (UnquantizedFusedMoEMethod,)


class WeightsNotApplied(RuntimeError):
    """The push failed before any live tensor changed (its message starts with OLD_WEIGHTS_KEPT)."""


class Staged:
    """One layer's staging parameters, and how many weight-loader calls the layer got in this push."""

    def __init__(self, layer: torch.nn.Module, metadata: dict[str, torch.Tensor]):
        self.params: dict[str, torch.nn.Parameter] = {}
        self.calls = 0
        for name, meta in metadata.items():
            tensor = restore_layer_refs(materialize_meta_tensor(meta), layer)
            loader = getattr(tensor, "weight_loader", default_weight_loader)
            tensor.weight_loader = self._counted(loader)
            self.params[name] = tensor

    def _counted(self, loader):
        def load(*args, **kwargs):
            self.calls += 1
            return loader(*args, **kwargs)

        return load


class StagedApply:
    """Per-model state kept across pushes (the staging tensors); `apply(tensors)` per push."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.staged: dict[torch.nn.Module, Staged] = {}
        self.tied: list[torch.nn.Module] = []  # layers whose parameters all belong to an earlier layer
        seen: set[int] = set()
        # vLLM's meta tensors materialize on the current device: the model's own
        with torch.device(next(model.parameters()).device):
            self._stage(model, seen)

    def _stage(self, model: torch.nn.Module, seen: set[int]) -> None:
        for layer in model.modules():
            own = list(layer._parameters.values())
            if own and all(id(p) in seen for p in own):
                self.tied.append(layer)
                continue
            seen.update(id(p) for p in own)
            if layer.__class__.__name__ in SKIP_MODULES or is_deferred_attention_layer(layer):
                continue
            params = {n: p for n, p in get_layerwise_info(layer).restore_metadata[0].items() if n not in SKIP_TENSORS}
            if params:
                self.staged[layer] = Staged(layer, params)

    @staticmethod
    def supported(model: torch.nn.Module) -> str | None:
        """None when this path applies to `model`, else why not (then use vLLM's reload)."""
        devices = {p.device for p in model.parameters()}
        if len(devices) != 1 or next(iter(devices)).type not in ("cpu", "cuda"):
            return f"parameters on {sorted(map(str, devices))}"
        # fused-MoE post-processing on CUDA (kernel-specific layouts) was never measured through this
        # path: MoE models on a GPU keep vLLM's layerwise reload
        known = KNOWN_METHODS + (_moe_methods() if next(iter(devices)).type == "cpu" else ())
        for name, layer in model.named_modules():
            own = [p for n, p in layer.named_parameters(recurse=False) if n not in SKIP_TENSORS]
            method = getattr(layer, "quant_method", None)
            if isinstance(method, QuantizeMethodBase) and not isinstance(method, known):
                return f"{name} is post-processed by {type(method).__name__}"
            if own and is_deferred_attention_layer(layer):
                return f"attention layer {name} has weights"
            if own and not get_layerwise_info(layer).restore_metadata[0]:
                return f"{name} has no recorded load-time metadata"
        return None

    @torch.no_grad()
    def apply(self, tensors) -> None:
        live = {layer: dict(layer._parameters) for layer in self.staged}
        for layer, staged in self.staged.items():
            staged.calls = 0
            layer._parameters.update(staged.params)
        try:
            self.model.load_weights(iter(tensors))  # into the staging tensors only
        except Exception as exc:
            for layer, params in live.items():  # nothing was processed yet: the old weights are whole
                _restore(layer, params)
            raise WeightsNotApplied(f"{OLD_WEIGHTS_KEPT}: loading the push failed: {exc!r}") from exc
        for layer, staged in self.staged.items():
            if staged.calls:
                self._process(layer, staged, live[layer])
            _restore(layer, live[layer])
        for layer in self.tied:
            # e.g. a tied lm_head: its weight is the embedding's, whose new GEMM handle was just packed
            weight = layer._parameters.get("weight")
            owner = next(
                (
                    o
                    for o, s in self.staged.items()
                    if s.calls and weight is not None and o._parameters.get("weight") is weight
                ),
                None,
            )
            if owner is None:
                continue
            method = getattr(layer, "quant_method", None)
            if (
                hasattr(owner, "cpu_linear")
                and hasattr(layer, "cpu_linear")
                and type(method) is type(getattr(owner, "quant_method", None))
            ):
                layer.cpu_linear = owner.cpu_linear  # the same dispatch on the same weight: the same handle
            elif isinstance(method, QuantizeMethodBase):
                method.process_weights_after_loading(layer)

    @staticmethod
    def _process(layer: torch.nn.Module, staged: Staged, live: dict[str, torch.nn.Parameter]) -> None:
        """vLLM's post-processing on the staging tensors, then the results into the live tensors."""
        method = getattr(layer, "quant_method", None)
        if isinstance(method, QuantizeMethodBase):
            method.process_weights_after_loading(layer)  # CPU linear: packs a new GEMM handle
            if hasattr(layer, "update_param_tp_status"):
                layer.update_param_tp_status()
        for name, param in live.items():
            if name in staged.params:
                param.data.copy_(getattr(layer, name))


def _restore(layer: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> None:
    for name in [n for n in layer._parameters if n not in params]:
        del layer._parameters[name]
    layer._parameters.update(params)
