"""Fashion-MNIST at paper scale: the paper's ResNet-9 recipe (full width, 50 epochs, batch 512, 10%
noise; README, "Paper settings") on full Fashion-MNIST (60,000 train / 10,000 test). The paper has no
Fashion-MNIST: this is the GPU counterpart of configs/fashion_mnist_resnet9_cpu.py. Measured on an
H100 (seed 0, first two experiments): docs/results/fashion_h100/README.md. For a GPU:
    python reproduce.py configs/fashion_mnist_resnet9_paper.py
then `python sweep.py ...` (same runs_dir) fills the GPU row of the scale study.
"""
dataset = "fashion_mnist"
model = "resnet9"
width = 1.0
noise = 0.1
epochs = 50
batch_size = 512
lr = 0.1
schedule = "triangle"
warmup = 0.25
weight_decay = 5e-4
augment = False

# neuron flipping: robust gradient over noised copies of the inputs, as the authors did
n_eot = 5
