"""The training step of several train_gpt2.py trees, in one process, taking turns step by step.

    python bench/interleaved_step.py /tmp/main /tmp/branch --steps=15

Separate runs of bench/train_throughput.py drift with a shared machine's load (+-10% between runs
minutes apart); here each tree's step runs between the others', so a change in load hits all alike.
The setup is train_throughput.py's default (6 layers, 384 wide, vocab 50304, B=8, T=256, 2
micro-steps, compiled, bf16). Prints each tree's median step and its speed against the last
tree's."""
import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import SyntheticLoader  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="directories holding a train_gpt2.py")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each tree")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    runs = []
    for i, tree in enumerate(args.trees):
        path = os.path.join(tree, "train_gpt2.py")
        spec = importlib.util.spec_from_file_location(f"train_gpt2_{i}", path)
        m = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = m  # dataclasses look their module up here
        spec.loader.exec_module(m)
        torch.manual_seed(0)
        raw = m.GPT(m.GPTConfig(block_size=1024, vocab_size=50304, n_layer=6, n_head=6, n_embd=384))
        m.tune_allocator()  # as main() does (older trees did it at import: again changes nothing)
        model = torch.compile(raw).train()
        loader = SyntheticLoader(8, 256, 50257)
        scaler = m.grad_scaler("cpu", "bfloat16")
        if hasattr(m, "Run"):  # train_step(run, lr), since the house restructuring
            optimizer = m.build_optimizer(raw, m.Settings(), "cpu")
            run = m.Run(m.Settings(), trained=model, optimizer=optimizer, train_loader=loader,
                        grad_accum_steps=2, autocast=autocast, scaler=scaler)
            runs.append(functools.partial(m.train_step, run, 6e-4))
        else:
            optimizer = raw.configure_optimizers(weight_decay=0.1, learning_rate=6e-4,
                                                 device_type="cpu")
            runs.append(functools.partial(m.train_step, model, optimizer, loader, 2, 6e-4, 1.0,
                                          autocast, "cpu", scaler))

    def step(i):
        t0 = time.perf_counter()
        runs[i]()
        return time.perf_counter() - t0

    for i in range(len(runs)):  # compile, then one warm-up step
        step(i)
        step(i)
    times = [[] for _ in runs]
    for k in range(args.steps):
        for i in (list(range(len(runs))) * 2)[k % len(runs):][:len(runs)]:  # the order rotates
            times[i].append(step(i))
    medians = [statistics.median(t) for t in times]
    for tree, med in zip(args.trees, medians):
        print(f"{tree}: median step {med * 1000:.0f} ms, {8 * 256 * 2 / med:,.0f} tok/s, "
              f"{medians[-1] / med:.3f}x the last tree's")


if __name__ == "__main__":
    main()
