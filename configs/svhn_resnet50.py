"""Paper setting: svhn x resnet50 (Maini et al. 2023; README, "Paper settings").
For a GPU: python <script>.py configs/svhn_resnet50.py"""
dataset = "svhn"
model = "resnet50"
width = 1.0
noise = 0.1
epochs = 50
batch_size = 512
lr = 0.05
schedule = "triangle"
warmup = 0.25
weight_decay = 5e-4
augment = False

# neuron flipping: robust gradient over noised copies of the inputs, as the authors did
n_eot = 5
