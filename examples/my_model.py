"""An example of a researcher's own model for --model=examples/my_model.py:factory (docs/own_model.md).

Any function factory(in_channels, num_classes, image_size) -> torch.nn.Module works: it is called
once per run under the run's initialization seed, and the module's forward(x) must return logits of
shape (batch, num_classes). Nothing else is required. This one is deliberately nested (a stem, a
ModuleDict of stages made of residual blocks, a head) to show how layer groups come out of the
module tree: stem, stages.stage1, stages.stage2, head.
"""
import torch.nn as nn


class Block(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (a projection when the shape changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU()
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(h)) + self.skip(x))


class MyNet(nn.Module):
    def __init__(self, in_channels, num_classes, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.ModuleDict({
            "stage1": nn.Sequential(Block(width, width), Block(width, width)),
            "stage2": nn.Sequential(Block(width, 2 * width, stride=2), Block(2 * width, 2 * width)),
        })
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)


def factory(in_channels, num_classes, image_size):
    return MyNet(in_channels, num_classes)
