"""Run by tests/test_weight_apply.py in its own process: one in-process vLLM engine (no server),
weights applied by StagedApply and by vLLM's layerwise reload in turn; prints JSON of the outputs.

    python tests/weight_apply_probe.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its model is reachable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from flywheel.server.weights.apply import StagedApply  # noqa: E402
from flywheel.server.weights.worker import reload_in_place, repack_cpu_moe  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "1 2 3 4"]


def main(model_dir: str) -> None:
    llm = LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0)
    model = llm.collective_rpc(lambda self: self.model_runner.get_model())[0]
    model_config = llm.collective_rpc(lambda self: self.model_runner.model_config)[0]
    a = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        a.update(load_file(f))
    g = torch.Generator().manual_seed(3)
    b = {
        k: v + 0.05 * v.float().std().to(v.dtype) * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in a.items()
    }
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=0)

    def outputs():
        done = llm.generate(PROMPTS, params, use_tqdm=False)
        return [
            [list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]]
            for o in done
        ]

    staged = StagedApply(model)
    result = {"unsupported": StagedApply.supported(model), "seconds": {}}

    def run(label, fn, weights):
        t0 = time.perf_counter()
        fn(list(weights.items()))
        result["seconds"][label] = round(time.perf_counter() - t0, 4)
        result[label] = outputs()

    def staged_apply(tensors):
        staged.apply(tensors)
        repack_cpu_moe(model)

    def layerwise(tensors):
        reload_in_place(model, model_config, tensors)

    result["a"] = outputs()
    run("staged_b", staged_apply, b)
    run("layerwise_a", layerwise, a)
    run("layerwise_b", layerwise, b)
    run("staged_a", staged_apply, a)

    def half_then_fail():
        items = list(b.items())
        yield from items[: len(items) // 2]
        raise OSError("bucket vanished mid-push")

    try:
        staged.apply(half_then_fail())
        result["failure"] = None
    except Exception as exc:  # noqa: BLE001
        result["failure"] = f"{type(exc).__name__}: {exc}"
    result["after_failure"] = outputs()
    run("staged_b_again", staged_apply, b)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
