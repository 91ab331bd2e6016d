"""lm-eval's speed through serve.py against its hf backend: the same model (a checkpoint for
serve.py, its export_hf.py export for hf), the same local four-way task and docs, the same batch
size, timed in one run, in float32.

    # GPT-2 124M's shape, random weights
    flock /tmp/bench.lock python bench/lm_eval_throughput.py
    flock /tmp/bench.lock python bench/lm_eval_throughput.py --model=log/model_019073.pt --docs=200

serve.py runs as a subprocess, as a user runs it, and lm-eval's local-completions talks to it over
HTTP; the hf backend runs in this process. Each backend is built (model loaded, tokenizer found)
before its clock starts; the clock covers simple_evaluate: building the requests, scoring them, and
the metrics. The backends run in turn, --rounds times, and each reports its best round: the machine
may be shared, and the best round is the one least disturbed. The task is HellaSwag-like: a context
of 30-60 words and four endings of 5-20.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train_gpt2 import GPT, MODEL_KEYS, GPTConfig  # noqa: E402

WORDS = ("the a man woman dog ball kitchen knife water slowly quickly then runs jumps holds shows "
         "camera guitar plays into over under bowl paint wall car wheel rope climbs rock snow ski "
         "board hair brush lemon cuts table smiles talks begins continues finally picks puts "
         "down up out").split()
TASK = """task: bench_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/docs.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(out_dir, docs, seed=0):
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(os.path.join(out_dir, "docs.jsonl"), "w") as f:
        for _ in range(docs):
            doc = {"query": words(30, 60), "choices": [words(5, 20) for _ in range(4)],
                   "label": rng.randrange(4)}
            f.write(json.dumps(doc) + "\n")
    with open(os.path.join(out_dir, "bench_choice.yaml"), "w") as f:
        f.write(TASK.format(dir=out_dir))


def checkpoint(spec, out_dir):
    """spec, or a random GPT of GPT-2 124M's shape saved as a checkpoint in out_dir."""
    if spec:
        return spec
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304))
    path = os.path.join(out_dir, "model_000000.pt")
    config = {k: getattr(model.config, k) for k in MODEL_KEYS}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def start_server(model, log_path):
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, f"{ROOT}/serve.py", f"--model={model}", "--port=0",
                                 "--device=cpu", "--dtype=float32"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving "):
        proc.kill()
        sys.exit(f"error: serve.py did not start:\n{open(log_path).read()}")
    return proc, re.search(r"http://127\.0\.0\.1:\d+", line)[0]


def run(args, work):
    """{backend: its best seconds}, {backend: (acc, acc_norm)}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    write_task(work, args.docs)
    model = checkpoint(args.model, work)
    export = os.path.join(work, "export")
    subprocess.run([sys.executable, f"{ROOT}/export_hf.py", f"--model={model}", f"--out={export}"],
                   check=True)
    proc, url = start_server(model, os.path.join(work, "serve.log"))
    try:
        tasks = TaskManager(include_path=work)
        backends = {
            "serve.py": LocalCompletionsAPI(base_url=f"{url}/v1/completions",
                                            batch_size=args.batch_size),
            "hf": HFLM(pretrained=export, dtype="float32", device="cpu",
                       batch_size=args.batch_size),
        }
        best = {}
        scores = {}
        for _ in range(args.rounds):
            for name, lm in backends.items():
                t0 = time.perf_counter()
                results = lm_eval.simple_evaluate(model=lm, tasks=["bench_choice"],
                                                  task_manager=tasks)
                seconds = time.perf_counter() - t0
                best[name] = min(best.get(name, seconds), seconds)
                metrics = results["results"]["bench_choice"]
                scores[name] = (metrics["acc,none"], metrics["acc_norm,none"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return best, scores


def main():
    # the docstring's first paragraph
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", default="",
                   help="checkpoint or run directory (default: random weights, GPT-2 124M's shape)")
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=16,
                   help="prompts a request (serve.py), rows a forward (hf)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the export alone is 500 MB at 124M
    with tempfile.TemporaryDirectory(prefix="lm_eval_bench_") as work:
        best, scores = run(args, work)
    print(f"\n{args.docs} docs x 4 choices, batch_size {args.batch_size}, float32, "
          f"{torch.get_num_threads()} threads, best of {args.rounds}")
    for name in best:
        print(f"{name:>9}: {best[name]:7.2f} s  {args.docs / best[name]:7.2f} docs/s  "
              f"acc {scores[name][0]:.3f}  acc_norm {scores[name][1]:.3f}")
    print(f"serve.py is {best['hf'] / best['serve.py']:.2f}x as fast as hf")


if __name__ == "__main__":
    main()
