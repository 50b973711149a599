"""The megatron-core backend: the same Policy as the transformers backend, on megatron's GPTModel.

cpu_patches.py  what megatron-core 0.16.1 needs without TransformerEngine / without CUDA
parallel.py     torch.distributed + megatron model-parallel groups (torchrun; gloo on CPU, NCCL on GPU)
model.py        HF config.json -> TransformerConfig + local layer spec (SDPA attention, grouped experts)
attention.py    SDPA core attention for the local spec
experts.py      grouped-GEMM experts and a host-sync-free token permutation
convert.py      HF <-> megatron weights, TP/EP/PP-sharded; convert_cli.py: `flywheel train convert`
policy.py       MegatronPolicy: the trainer's Policy protocol (trainer/policy_interface.py)
"""


def build_policy(config):
    """trainer.backend.build_policy's entry point for `backend: megatron`."""
    from flywheel.trainer.megatron.policy import MegatronPolicy

    return MegatronPolicy(config)
