"""lm-evaluation-harness log-likelihood scoring: `jaxlm serve` (its `local-completions` model: echo +
logprobs) against lm-eval's own `hf` backend (transformers, torch eager), on the same model, in one run.

The task is a four-way cloze built from the embedded corpus: a context of three lines of a play, the true
next line and three lines drawn from elsewhere as the choices (lm-eval's multiple_choice: one loglikelihood
request per choice). Both sides score the same requests; the script compares their accuracy and per-choice
log-likelihoods. Each side is timed on its second evaluation, the first being of other questions (it
compiles and warms up; jaxlm's prefix cache holds nothing of the timed questions).
Tokens/s counts every scored token (context + continuation) of every request.

    python experiments/bench_lm_eval.py [--model-dir HF_DIR] [--questions 64] [--batch 16] [--chunk 32]

jaxlm serves as `jaxlm serve --warm-up-scoring --chunk 32` would: prompts prefill in pieces of chunk / 4 = 8
tokens, so a choice's tail after the shared context's cached blocks pads to 8, not 16 (12.5 s against 13.5 s
at --chunk 64, measured).

Default model: SmolLM2-135M-Instruct (tests/real_model.py builds it). Writes
experiments/results/bench_lm_eval.json and .png.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery import bars, real_model_dir, real_model_parser, save  # noqa: E402

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def cloze(n: int, seed: int = 0) -> list[dict]:
    """n questions: three lines of a play, then its next line among three others."""
    from jaxlm.data.corpus import embedded_works

    rng = np.random.default_rng(seed)
    lines = [x.strip() for t in embedded_works().values() for x in t.splitlines() if len(x.strip()) > 25]
    out = []
    for _ in range(n):
        i = int(rng.integers(3, len(lines) - 1))
        others = [lines[int(j)] for j in rng.integers(0, len(lines), 3)]
        answer = int(rng.integers(4))
        choices = others[:answer] + [lines[i]] + others[answer:]
        out.append({"context": "\n".join(lines[i - 3 : i]), "choices": choices, "answer": answer})
    return out


def evaluate(lm, task_manager, task="jaxlm_cloze"):
    import lm_eval

    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, log_samples=True)
    seconds = time.perf_counter() - t
    lls = [[r[0][0] for r in s["resps"]] for s in out["samples"][task]]
    return seconds, out["results"][task]["acc,none"], np.array(lls)


def main():
    p = real_model_parser(__doc__, "bench_lm_eval")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="hf's batch size; jaxlm: prompts per request = slots")
    p.add_argument("--chunk", type=int, default=32, help="jaxlm serve --chunk (prefill pieces of chunk / 4)")
    args = p.parse_args()
    started = time.perf_counter()

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from jaxlm.quantize import default_weights, store_weights
    from jaxlm.serve.model import load_served
    from jaxlm.serve.server import build_service, running

    args.model_dir = real_model_dir(args.model_dir)
    torch.set_num_threads(os.cpu_count())
    work = Path(tempfile.mkdtemp())
    questions = cloze(args.questions)
    for name, qs in (("jaxlm_cloze", questions), ("jaxlm_cloze_warm_up", cloze(args.questions, seed=1))):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
        (work / f"{name}.yaml").write_text(TASK.format(name=name, data=work / f"{name}.jsonl"))
    tasks = TaskManager(include_path=str(work))

    served = load_served(args.model_dir, name="model")
    store_weights(served.model, default_weights(served.model))  # as `jaxlm serve` stores them
    tokens = sum(
        len(served.tokenizer.encode(q["context"] + "\n" + c)) for q in questions for c in q["choices"]
    )  # what each side scores, to a token or so (lm-eval encodes context and continuation apart)
    service = build_service(
        served, slots=args.batch, chunk=args.chunk, warm_up_tokens=128, warm_up_scoring=True, release_model=True
    )
    with running(service) as url:
        lm = LocalCompletionsAPI(
            base_url=url + "/v1/completions", model="model", tokenizer_backend="huggingface",
            tokenizer=args.model_dir, batch_size=args.batch, max_length=served.context, max_retries=1,
        )  # fmt: skip
        evaluate(lm, tasks, "jaxlm_cloze_warm_up")  # compiles the scoring steps
        hits = service.worker.engine.kv["prefix_hit_tokens"]
        ours_s, ours_acc, ours_ll = evaluate(lm, tasks)
        hits = service.worker.engine.kv["prefix_hit_tokens"] - hits
    del service
    hf = HFLM(pretrained=args.model_dir, dtype="float32", device="cpu", batch_size=args.batch)
    evaluate(hf, tasks, "jaxlm_cloze_warm_up")
    ref_s, ref_acc, ref_ll = evaluate(hf, tasks)

    diff = np.abs(ours_ll - ref_ll) / np.maximum(1.0, np.abs(ref_ll))
    result = {
        "model": args.model_dir,
        "questions": args.questions,
        "requests": 4 * args.questions,
        "tokens_scored": tokens,
        "batch": args.batch,
        "chunk": args.chunk,
        "threads": os.cpu_count(),
        "jaxlm": {"seconds": round(ours_s, 2), "tokens_per_s": round(tokens / ours_s, 1), "acc": ours_acc},
        "hf": {"seconds": round(ref_s, 2), "tokens_per_s": round(tokens / ref_s, 1), "acc": ref_acc},
        "speedup": round(ref_s / ours_s, 2),
        "jaxlm_prefix_cache_hit_tokens": hits,
        "max_relative_ll_difference": float(diff.max()),
        "same_choices": bool((ours_ll.argmax(1) == ref_ll.argmax(1)).all()),
    }
    print(json.dumps(result, indent=1))
    fig = bars(
        ["jaxlm serve\n(local-completions)", "lm-eval hf\n(transformers)"], [tokens / ours_s, tokens / ref_s],
        ylabel="scored tokens/s", title=f"lm-eval loglikelihood, {4 * args.questions} requests ({result['speedup']}x)",
    )  # fmt: skip
    save(Path(args.out), result, fig, started=started)


if __name__ == "__main__":
    main()
