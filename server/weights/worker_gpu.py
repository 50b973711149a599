"""vLLM's NCCL and CUDA-IPC weight-transfer engines, with Flywheel's bucket path and post-load fix-ups.

Registered by worker.py as the backends "flywheel_nccl" and "flywheel_ipc" (lazily: this module
imports vLLM's GPU engines and is loaded only by a server whose ServeConfig.weight_transports
names nccl or ipc). Each is vLLM's engine (init handshake, NCCL receive, packed buffers) plus:
  - an update whose info names `files` is a shm/http bucket push (worker.receive_files), so one
    server accepts buckets and its GPU transport alike;
  - the layerwise reload session starts with the first GPU chunk and ends in finish, followed by
    the fix-ups vLLM's reload leaves undone (tied lm_head, CPU MoE packing: worker.after_reload);
  - ipc: the handles arrive as Flywheel's JSON form (gpu.py, never pickle) and every tensor is
    mapped and checked for NaN/Inf *before* the reload starts, so a bad handle or bad values fail
    while the old weights still serve; then they load through apply.py's staged path (staging
    tensors, then a device copy into the live ones) where it applies, else vLLM's layerwise reload.
Cannot run without CUDA; the argument handling around it is tested in tests/test_weight_transports.py.
"""

from __future__ import annotations

import torch
from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

from flywheel.server.weights.gpu import decode_ipc_args
from flywheel.server.weights.worker import after_reload, receive_files, refuse_non_finite, staged_apply


class _FlywheelSession:
    """Mixin over a vLLM engine whose start/finish_weight_update run the layerwise reload."""

    _native_session = False

    def start_weight_update(self) -> None:
        self._native_session = False  # started lazily: a bucket push reloads on its own

    def update_weights(self, update_info: dict) -> None:
        if "files" in update_info:
            receive_files(self, update_info["files"])
        else:
            self.receive_gpu(update_info)
        torch.accelerator.synchronize()

    def begin_native(self) -> None:
        if not self._native_session:
            super().start_weight_update()  # vLLM: initialize_layerwise_reload
            self._native_session = True

    def finish_weight_update(self) -> None:
        if self._native_session:
            super().finish_weight_update()  # vLLM: finalize_layerwise_reload
            after_reload(self.model, self.model_config)
            self._native_session = False

    def receive_gpu(self, update_info: dict) -> None:
        raise NotImplementedError


class FlywheelNCCLEngine(_FlywheelSession, NCCLWeightTransferEngine):
    def receive_gpu(self, update_info: dict) -> None:
        info = self.parse_update_info(update_info)  # names, dtype_names, shapes (validated by the API process)
        if self.model_update_group is None:
            raise RuntimeError("the NCCL group is not formed: the trainer must call init_nccl() first")
        self.begin_native()
        self.receive_weights(info)  # vLLM's packed / one-by-one broadcast receive, into load_weights


class FlywheelIPCEngine(_FlywheelSession, IPCWeightTransferEngine):
    def receive_gpu(self, update_info: dict) -> None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        handles = update_info.get("flywheel_ipc_handles")
        if handles is None:
            raise ValueError("an ipc update needs flywheel_ipc_handles")
        device_index = self.device.index
        here = str(torch.cuda.get_device_properties(device_index).uuid)
        weights = []
        for name, handle in zip(update_info["names"], handles):  # 1. map every tensor first
            uuid, args = decode_ipc_args(handle)
            if uuid != here:
                raise ValueError(f"IPC handle of {name!r} is for GPU {uuid}, this worker is on {here}")
            args = list(args)
            args[6] = device_index  # as vLLM's engine does: the receiver's own index of that GPU
            weights.append((name, rebuild_cuda_tensor(*args)))
        refuse_non_finite(weights)  # 2. values a server must never serve (NaN/Inf give empty answers)
        staged = staged_apply(self)
        with disable_mtp_completeness_check():
            if staged is not None:  # 3. into staging tensors, then one copy each into the live ones (apply.py)
                staged.apply(weights)
            else:  # 3. or vLLM's layerwise reload: only now take the model apart
                self.begin_native()
                self.model.load_weights(weights)
