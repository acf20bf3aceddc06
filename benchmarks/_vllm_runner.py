"""vLLM side of ``benchmarks/peer_vllm.py``: runs in vLLM's own venv, driven over stdin/stdout.

    <vllm-venv>/bin/python benchmarks/_vllm_runner.py --model-dir DIR --dtype bfloat16 --max-num-seqs 8

Protocol (one JSON object per line): the runner answers ``{"ready": true, "versions": {...}}``
once the engine is built, then for every request line
``{"op": "generate", "prompts": [[ids...], ...], "new_tokens": N}`` answers
``{"ok": true, "seconds": t, "tokens": [[ids...], ...]}`` (greedy, EOS ignored: exactly N new
tokens per prompt, an EOS may be sampled and decoding goes on, as in ours; ``seconds`` is the
wall time of ``LLM.generate`` alone), and for
``{"op": "quit"}`` exits. A failure answers ``{"ok": false, "error": "..."}``.

Everything else vLLM prints (its logs, C-level output) goes to stderr: the protocol has the
original stdout to itself. Only the standard library is imported at module level, and ``LLM`` is
created under ``if __name__ == "__main__":`` (vLLM's engine process re-imports this module).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _channel():
    """The original stdout for protocol lines; fd 1 becomes stderr for everything else."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _send(proto, obj: dict) -> None:
    proto.write(json.dumps(obj) + "\n")
    proto.flush()


def _generate(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    from vllm import SamplingParams

    # ignore_eos alone gives exactly N tokens; min_tokens would also mask EOS's logit (ours does not)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return {"ok": True, "seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--dtype", required=True, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    proto = _channel()
    try:
        import torch
        import vllm
        from vllm import LLM

        llm = LLM(model=args.model_dir, tokenizer=args.model_dir, dtype=args.dtype, seed=0,
                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                  enforce_eager=args.enforce_eager, skip_tokenizer_init=False)
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which prints the log
        _send(proto, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(proto, {"ready": True, "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                              "torch_threads": torch.get_num_threads()}})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            if req.get("op") != "generate":
                raise ValueError(f"unknown op {req.get('op')!r}")
            _send(proto, _generate(llm, req["prompts"], int(req["new_tokens"])))
        except Exception as exc:  # noqa: BLE001 - one bad request does not end the runner
            _send(proto, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
