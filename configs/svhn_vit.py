"""Paper setting: svhn x vit (Maini et al. 2023; README, "Paper settings").
For a GPU: python <script>.py configs/svhn_vit.py"""
dataset = "svhn"
model = "vit"
width = 1.0
noise = 0.1
epochs = 50
batch_size = 128
lr = 0.01
schedule = "triangle"
warmup = 0.25
weight_decay = 5e-4
augment = False

# neuron flipping: robust gradient over noised copies of the inputs, as the authors did
n_eot = 5
