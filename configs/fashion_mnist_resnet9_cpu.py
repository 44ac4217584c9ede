"""Full Fashion-MNIST (60,000 train / 10,000 test) on a CPU: not a paper setting (the paper has no
Fashion-MNIST), the embedded default's recipe at full scale. Offline where the Debian package
dataset-fashion-mnist is installed. It memorizes only part of the noisy labels in 20 epochs (measured
cost and memorization: README, "Paper settings").
    python <script>.py configs/fashion_mnist_resnet9_cpu.py
    make reproduce CONFIG=configs/fashion_mnist_resnet9_cpu.py ARGS="--seeds=[0]"
"""
dataset = "fashion_mnist"
model = "resnet9"
width = 0.25
noise = 0.1
epochs = 20
batch_size = 128
lr = 0.05
schedule = "triangle"
warmup = 0.25
weight_decay = 5e-4
augment = False
