"""The model zoo: resnet9, resnet50, vit, cnn -- and their layer groups.

Every model keeps its computation in an ordered `layers` container. Its *layer groups* (the unit
that accounting, rewinding and retraining work on) are derived from that tree: each child of
`layers` that holds parameters is one group, except containers marked `expand_groups` (the
residual blocks of ResNet-9), whose children are groups of their own. So ResNet-9 has its 8 conv+BN
blocks and the head (9 groups), ResNet-50 stem, stage1..4 and head, the ViT its patch embedding,
each block and the head.

`forward(x, index=None)`: `index` holds the batch's example indices; modules with `wants_index`
(example-tied dropout) receive it, every other module ignores it.

Dropout (optional, off by default): `build_model(..., dropout=factory)` puts `factory(layer_name,
channels, channel_dim)` after each conv block of resnet9 and cnn (inside ConvBN, after the ReLU),
after each stage of resnet50, and on the hidden units of every ViT MLP (between act and fc2).
Dropout modules hold no parameters or buffers, so state_dict keys, layer groups and the
initialization for a seed are the same with or without them.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import config
from .rng import derive_seed

MODELS = ("resnet9", "resnet50", "vit", "cnn")
config.choice_check("model", MODELS)
config.range_check("width", 0, None, lo_open=True)


class Net(nn.Module):
    """A zoo model: `layers` is the computation; example indices are handed to the modules that want them."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, x, index=None):
        for m in self.modules():
            if getattr(m, "wants_index", False):
                m.index = index
        return self.layers(x)


class Residual(nn.Sequential):
    """x + body(x); each module of the body is a layer group of its own."""
    expand_groups = True

    def forward(self, x):
        return x + super().forward(x)


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU: one "layer" of the paper; optional dropout after the ReLU."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, padding=1, drop=None):
        layers = OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True))
        if drop is not None:
            layers["drop"] = drop
        super().__init__(layers)


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _ch(n, width):
    return max(1, int(round(n * width)))


def _dropper(dropout):
    """dropout(name, channels) for the builders: the factory's module, or None without dropout."""
    return (lambda name, channels, channel_dim=1: None) if dropout is None else dropout


def resnet9(in_channels, num_classes, image_size, width=1.0, dropout=None):
    """DAWNBench/FFCV ResNet-9: widths 64-128-128-128-256-256-256-128, 5x5 stride-2 second conv,
    two residual blocks, adaptive max-pool, bias-free linear head, logits scaled by 0.2."""
    c = [_ch(n, width) for n in (64, 128, 256)]
    d = _dropper(dropout)
    return Net([
        ("conv1", ConvBN(in_channels, c[0], drop=d("conv1", c[0]))),
        ("conv2", ConvBN(c[0], c[1], kernel_size=5, stride=2, padding=2, drop=d("conv2", c[1]))),
        ("res1", Residual(ConvBN(c[1], c[1], drop=d("res1.0", c[1])), ConvBN(c[1], c[1], drop=d("res1.1", c[1])))),
        ("conv3", ConvBN(c[1], c[2], drop=d("conv3", c[2]))),
        ("pool", nn.MaxPool2d(2)),
        ("res2", Residual(ConvBN(c[2], c[2], drop=d("res2.0", c[2])), ConvBN(c[2], c[2], drop=d("res2.1", c[2])))),
        ("conv4", ConvBN(c[2], c[1], padding=0, drop=d("conv4", c[1]))),
        ("gpool", nn.AdaptiveMaxPool2d(1)),
        ("flatten", nn.Flatten()),
        ("head", nn.Linear(c[1], num_classes, bias=False)),
        ("scale", Scale(0.2)),
    ])


def cnn(in_channels, num_classes, image_size, width=1.0, dropout=None):
    """A small CNN, fast on a CPU: three conv+BN blocks and a linear head."""
    c = [_ch(n, width) for n in (32, 64, 128)]
    d = _dropper(dropout)
    return Net([
        ("conv1", ConvBN(in_channels, c[0], drop=d("conv1", c[0]))),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", ConvBN(c[0], c[1], drop=d("conv2", c[1]))),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", ConvBN(c[1], c[2], drop=d("conv3", c[2]))),
        ("gpool", nn.AdaptiveMaxPool2d(1)),
        ("flatten", nn.Flatten()),
        ("head", nn.Linear(c[2], num_classes)),
    ])


def resnet50(in_channels, num_classes, image_size, width=1.0, dropout=None):
    """torchvision's ResNet-50 with a small-image stem (3x3 stride-1 conv, no max-pool);
    `width` scales the bottleneck width (width_per_group = 64 * width).
    Dropout goes after each stage as parameter-free entries `stage<k>_drop` (not layer groups)."""
    import torchvision
    tv = torchvision.models.resnet50(num_classes=num_classes, width_per_group=_ch(64, width))
    stem = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), bn=nn.BatchNorm2d(64), relu=nn.ReLU(inplace=True)))
    nn.init.kaiming_normal_(stem.conv.weight, mode="fan_out", nonlinearity="relu")
    d = _dropper(dropout)
    stages = []
    for k in range(1, 5):
        stage = getattr(tv, f"layer{k}")
        stages.append((f"stage{k}", stage))
        drop = d(f"stage{k}", stage[-1].conv3.out_channels)
        if drop is not None:
            stages.append((f"stage{k}_drop", drop))
    return Net([("stem", stem), *stages, ("gpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                ("head", tv.fc)])


class PatchEmbed(nn.Module):
    """Image -> patch tokens with a class token and learned position embeddings."""

    def __init__(self, in_channels, dim, image_size, patch):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image_size // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is Sequential(fc1, act, fc2) so dropout can go on its hidden units."""

    def __init__(self, dim, heads, mlp_dim, drop=None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        mlp = OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU())
        if drop is not None:
            mlp["drop"] = drop  # on the hidden units, each token of an example with the same mask
        mlp["fc2"] = nn.Linear(mlp_dim, dim)
        self.mlp = nn.Sequential(mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    def forward(self, x):
        return x[:, 0]


def vit(in_channels, num_classes, image_size, width=1.0, depth=6, heads=8, patch=4, dropout=None):
    """A small ViT for 28-32 px images: 4x4 patches, 6 blocks, 8 heads, dim 256*width."""
    dim = heads * max(1, int(round(32 * width)))
    d = _dropper(dropout)
    return Net([("embed", PatchEmbed(in_channels, dim, image_size, patch))]
               + [(f"block{i + 1}", Block(dim, heads, 2 * dim, drop=d(f"block{i + 1}.mlp", 2 * dim, -1)))
                  for i in range(depth)]
               + [("head", nn.Sequential(OrderedDict(norm=nn.LayerNorm(dim), cls=ClassToken(),
                                                     fc=nn.Linear(dim, num_classes))))])


_BUILDERS = {"resnet9": resnet9, "resnet50": resnet50, "vit": vit, "cnn": cnn}


def build_model(name, in_channels, num_classes, image_size, width=1.0, seed=0, **kwargs):
    """A freshly initialized model; initialization depends only on (name, shapes, width, seed).

    `dropout=factory` (see the module docstring) adds parameter-free dropout modules; the weights
    are the same as without them."""
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(derive_seed(seed, "init"))
        return _BUILDERS[name](in_channels, num_classes, image_size, width, **kwargs)


def model_for(cfg, data, dropout=None):
    """The configured model for a dataset, initialized from cfg.model_seed, on the data's device
    (`dropout`: an optional factory, see build_model)."""
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size, cfg.width, cfg.model_seed,
                        dropout=dropout)
    return model.to(data.device, memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU


# ----------------------------------------------------------------------------- layer groups

def layer_groups(model):
    """Ordered [(group name, module)], input to output, derived from `model.layers`."""
    def walk(prefix, module):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if getattr(child, "expand_groups", False):
                yield from walk(path + ".", child)
            elif any(True for _ in child.parameters()):
                yield path, child
    return list(walk("", model.layers))


def group_keys(model):
    """Ordered {group name: [state_dict keys]} (parameters and buffers, e.g. BatchNorm statistics)."""
    return {name: [f"layers.{name}.{k}" for k in module.state_dict()] for name, module in layer_groups(model)}


def group_params(model):
    """Ordered {group name: [parameters]}."""
    return {name: list(module.parameters()) for name, module in layer_groups(model)}


def group_of(model):
    """{full parameter or buffer name in model.state_dict(): its layer group}."""
    paths = {id(m): n for n, m in model.named_modules()}
    return {f"{paths[id(module)]}.{k}": name for name, module in layer_groups(model) for k in module.state_dict()}


def stages(model):
    """The model's computation as top-level modules that, run in order, equal model(x) (a zoo model's
    `layers`), or None where the forward is not such a sequence: code that reuses the output of an
    unchanged front of the network must then run the whole model."""
    layers = getattr(model, "layers", None)
    return list(layers.children()) if isinstance(layers, nn.Sequential) else None
