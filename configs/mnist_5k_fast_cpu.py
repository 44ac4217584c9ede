"""The embedded default with cheaper experiment budgets, for a 3-seed reproduction on a 2-core CPU
(docs/benchmarks.md, "The reproduction on 2 CPU cores"). Not the authors' protocol: the same trained
runs (every training key is the default's), but fewer flipping targets (20 of each kind, not 50: wider
CIs for claim 4) and half the retraining budget (10 epochs per group, not the authors' 20: claim 3's
"back" may need more). Run it with no variants:
    make reproduce-fast        # = python reproduce.py configs/mnist_5k_fast_cpu.py --variant_seeds=0 --jobs=2
Its report and seeds go to reports/mnist_5k_fast_cpu/ and docs/results/mnist_5k_fast_cpu/, never beside
the default's.
"""
dataset = "mnist_5k"     # every training key stays the default's
n_examples = 20
retrain_epochs = 10
