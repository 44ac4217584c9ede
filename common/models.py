"""Models: the zoo (resnet9, resnet50, vit, cnn), any torchvision classifier, a user's own factory --
and their layer groups.

The `model` knob takes a model spec:
    resnet9 | resnet18 | resnet50 | vit | cnn   the zoo (`width` scales it; it applies to the zoo only)
    torchvision:<name>                      a torchvision classification builder, randomly initialized
                                            (weights=None), adapted to the data (docs/own_model.md)
    path/to/file.py:factory                 factory(in_channels, num_classes, image_size) -> nn.Module
    package.module:factory                  the same, imported as a module
Every model is initialized under a seed derived from model_seed, and every model takes
`forward(x, index=None)`: `index` holds the batch's example indices; modules with `wants_index`
(example-tied dropout) receive it, every other module ignores it. A zoo model is a `Net` whose
computation is the ordered container `layers`; any other model is wrapped in `External`, whose `net`
is the user's (or torchvision's) module, so its state_dict keys are the module's own under "net.".

Layer groups (the unit that accounting, rewinding and retraining work on) are derived from the
module tree; a group is named by its module path below the model's *root* (`layers` for the zoo,
`net` otherwise), and holds every parameter and buffer under that path:
  - the zoo: each child of `layers` that holds parameters, containers marked `expand_groups` (the
    residual blocks of ResNet-9, the stages of ResNet-18) replaced by their children. So ResNet-9 has
    its 8 conv+BN blocks and the head (9 groups), ResNet-18 its stem, 8 basic blocks and head (10),
    ResNet-50 stem, stage1..4 and head, the ViT its patch embedding, each block and the head;
  - other models: the root's children that hold parameters or buffers (tensors held by the root
    itself are groups of their own, first); a root with a single such child and no tensors of its
    own is a wrapper, looked through; a child that is a plain container (nn.Sequential,
    nn.ModuleList, nn.ModuleDict, not a subclass) of two or more children with weight matrices
    (parameters of 2 or more dims: convs, linears), or one marked `expand_groups`, is replaced by
    its children (one level): blocks and layers become groups, a conv + norm stem stays one;
  - a root module with a `layer_groups()` method returning module-name prefixes: those groups;
  - the shared knob `groups` (module-name prefixes below the root): those groups, for any model.
Groups must cover every parameter and buffer exactly once (checked when the model is built).

Dropout (optional, off by default): `build_model(..., dropout=factory)` puts `factory(layer_name,
channels, channel_dim)` after each conv block of resnet9 and cnn (inside ConvBN, after the ReLU),
after layer2 and layer3 of resnet18 (the authors' ETD model), after each stage of resnet50, and on the hidden units of every ViT MLP (between act and fc2); on
other models, or where `dropout_after` names the places, common.dropout.place puts it after
chosen modules with forward hooks. Dropout modules hold no parameters or buffers, so state_dict
keys, layer groups and the initialization for a seed are the same with or without them.
"""
import importlib
import importlib.util
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import config
from .cli import UserError
from .rng import derive_seed

MODELS = ("resnet9", "resnet18", "resnet50", "vit", "cnn")  # the zoo
TORCHVISION = "torchvision:"
SMALL_IMAGE = 64  # images up to this size get a small-image stem on torchvision models built for 224 px
HOW_TO_LIST = ("list them with: python -c \"import torchvision; "
               "print(torchvision.models.list_models(module=torchvision.models))\"")


# ----------------------------------------------------------------------------- model specs

def parse_spec(spec):
    """("zoo", name) | ("torchvision", name) | ("file", path, factory) | ("module", module, factory)."""
    if spec in MODELS:
        return ("zoo", spec)
    if spec.startswith(TORCHVISION):
        return ("torchvision", spec[len(TORCHVISION):])
    where, colon, factory = spec.rpartition(":")
    if not colon or not where or not factory.isidentifier():
        return None
    return ("file", where, factory) if where.endswith(".py") else ("module", where, factory)


def _spec_error(spec):
    return (f"unknown model {spec!r}; valid: {', '.join(MODELS)}, torchvision:<name> (e.g. torchvision:resnet18), "
            f"path/to/file.py:factory or package.module:factory (docs/own_model.md)")


def torchvision_names():
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)  # classification models only


def _resolve_file(path):
    """A factory file: as given (relative to the working directory), else relative to the repository."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    repo = Path(__file__).resolve().parent.parent / path
    return repo.resolve() if repo.is_file() else None


def load_factory(spec):
    """The user's factory function named by a file or module spec (its code runs: the user chose it)."""
    kind, where, name = parse_spec(spec)
    if kind == "file":
        path = _resolve_file(where)
        if path is None:
            raise UserError(f"model factory file {where} not found; give an existing file as --model=path/to/file.py:{name}")
        module_name = "_user_model_" + re.sub(r"\W", "_", str(path))
        module = sys.modules.get(module_name)
        if module is None:
            try:
                loader = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
            except Exception as e:
                raise UserError(f"model factory file {where} failed to run: {_reason(e)}; fix the file")
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise UserError(f"cannot import module {where!r} for --model={spec}: {_reason(e)}; "
                            f"make it importable (PYTHONPATH) or give path/to/file.py:{name}")
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"{where} has no function {name!r}; define {name}(in_channels, num_classes, image_size) "
                        f"-> nn.Module there")
    return factory


def _reason(e):
    """An exception as one short line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def check_model(spec, cfg=None):
    """The config check of `model`: None when the spec names a model we can build, else the error text."""
    parsed = parse_spec(spec)
    if parsed is None:
        return _spec_error(spec)
    if parsed[0] == "torchvision":
        names = torchvision_names()
        if parsed[1] not in names:
            import difflib
            close = difflib.get_close_matches(parsed[1], names, n=3)
            hint = f"did you mean {', '.join(TORCHVISION + c for c in close)}? " if close else ""
            return f"unknown torchvision model {parsed[1]!r}; {hint}{HOW_TO_LIST}"
    elif parsed[0] in ("file", "module"):
        try:
            load_factory(spec)
        except UserError as e:
            return str(e)
    return None


def model_tag(spec):
    """A readable, filesystem-safe name of a model spec for run directories: the zoo name itself,
    tv-<name> for torchvision, <file or module>-<factory> for a user factory."""
    parsed = parse_spec(spec)
    if parsed is None or parsed[0] == "zoo":
        tag = spec
    elif parsed[0] == "torchvision":
        tag = f"tv-{parsed[1]}"
    else:
        where = Path(parsed[1]).stem if parsed[0] == "file" else parsed[1].rsplit(".", 1)[-1]
        tag = f"{where}-{parsed[2]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)


def _check_groups_knob(v, cfg):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(g, str) and g for g in v):
        return (f"groups={v!r} must be None or a non-empty list of module-name prefixes, "
                f"e.g. --groups=['conv1','layer1','layer2','fc']")
    return None


config.register_check("model", check_model)
config.range_check("width", 0, None, lo_open=True)
config.register_check("groups", _check_groups_knob)


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


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, the shortcut an identity or a 1x1 conv+BN; ReLU after the sum."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class Stage(nn.Sequential):
    """A ResNet stage; each of its blocks is a layer group of its own."""
    expand_groups = True


RESNET18_DROP = ("layer2", "layer3")  # the authors' ETD ResNet-18: dropout after these stages only


def resnet18(in_channels, num_classes, image_size, width=1.0, dropout=None):
    """The authors' ResNet-18 (their models/resnet18_custom.py, after kuangliu's CIFAR ResNet): a
    small-image stem (3x3 stride-1 conv + BN + ReLU, no max-pool), four stages of two basic blocks,
    widths 64-128-256-512 times `width`, global average pool, linear head with bias. Dropout goes
    after layer2 and layer3 (RESNET18_DROP, their forward's two active places) as parameter-free
    entries `layer<k>_drop` (not layer groups). Groups: stem, each block (layer1.0 ... layer4.1), head."""
    c = [_ch(n, width) for n in (64, 128, 256, 512)]
    d = _dropper(dropout)
    layers = [("stem", nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False),
                                                 bn=nn.BatchNorm2d(c[0]), relu=nn.ReLU(inplace=True))))]
    cin = c[0]
    for k, (cout, stride) in enumerate(zip(c, (1, 2, 2, 2)), 1):
        layers.append((f"layer{k}", Stage(BasicBlock(cin, cout, stride), BasicBlock(cout, cout))))
        cin = cout
        drop = d(f"layer{k}", cout) if f"layer{k}" in RESNET18_DROP else None
        if drop is not None:
            layers.append((f"layer{k}_drop", drop))
    return Net(layers + [("gpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                         ("head", nn.Linear(c[3], num_classes))])


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


_BUILDERS = {"resnet9": resnet9, "resnet18": resnet18, "resnet50": resnet50, "vit": vit, "cnn": cnn}


# ----------------------------------------------------------------------------- torchvision and user models

class External(nn.Module):
    """A torchvision or user model (`net`) behind the zoo's interface, forward(x, index=None):
    modules with `wants_index` get the batch's example indices, as in Net."""

    def __init__(self, net, spec):
        super().__init__()
        self.net = net
        self.spec = spec

    def forward(self, x, index=None):
        for m in self.modules():
            if getattr(m, "wants_index", False):
                m.index = index
        return self.net(x)


TRANSFORMERS = ("vit_", "swin", "maxvit")  # patch-embedding stems: left as they are


def _init_stem_conv(conv, name):
    """Initialize a replaced first conv the way torchvision initializes that family's convs."""
    if name.startswith("vit_"):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / fan_in))
    elif name.startswith(("swin", "convnext", "maxvit")):
        nn.init.trunc_normal_(conv.weight, std=0.02)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _set_module(root, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def adapt_torchvision(net, name, in_channels, image_size):
    """Fit a torchvision classifier built for 224 px RGB to the data, in place; returns a list of
    what changed. The first Conv2d takes `in_channels`. For images up to SMALL_IMAGE px (not the
    transformers): a stem whose strided first conv is followed by a max-pool before the second conv
    (ResNet, ResNeXt, Wide ResNet, DenseNet, ShuffleNetV2, GoogLeNet, SqueezeNet, AlexNet) gets a
    3x3 stride-1 first conv and no max-pool; any other strided first conv (MobileNet, EfficientNet,
    MnasNet, RegNet, ConvNeXt) has its stride halved."""
    order = list(net.named_modules())
    convs = [i for i, (_, m) in enumerate(order) if isinstance(m, nn.Conv2d)]
    if not convs:
        return []
    path, first = order[convs[0]]
    kernel, stride, padding = first.kernel_size, first.stride, first.padding
    changes = []
    if image_size <= SMALL_IMAGE and not name.startswith(TRANSFORMERS) and max(stride) > 1:
        end = convs[1] if len(convs) > 1 else len(order)
        pool = next((n for n, m in order[convs[0]:end] if isinstance(m, nn.MaxPool2d)), None)
        if pool is not None:
            kernel, stride, padding = (3, 3), (1, 1), (1, 1)
            _set_module(net, pool, nn.Identity())
            changes.append(f"{pool}: max-pool removed")
        else:
            stride = tuple(max(1, s // 2) for s in stride)
    if (in_channels, kernel, stride, padding) != (first.in_channels, first.kernel_size, first.stride, first.padding):
        conv = nn.Conv2d(in_channels, first.out_channels, kernel, stride, padding, dilation=first.dilation,
                         groups=first.groups if first.groups == 1 else in_channels,
                         bias=first.bias is not None, padding_mode=first.padding_mode)
        _init_stem_conv(conv, name)
        _set_module(net, path, conv)
        changes.insert(0, f"{path}: {first.in_channels}->{in_channels} channels, kernel {tuple(first.kernel_size)}->"
                          f"{kernel}, stride {tuple(first.stride)}->{stride}")
    return changes


def _torchvision(name, in_channels, num_classes, image_size):
    import torchvision
    kwargs = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size  # position embeddings for the data's size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # one output tensor
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)  # never a download
    except Exception as e:
        raise UserError(f"torchvision:{name} cannot be built for {num_classes} classes and {image_size} px images "
                        f"({_reason(e)}); pick another model for this data")
    adapt_torchvision(net, name, in_channels, image_size)
    return net


def _from_factory(spec, in_channels, num_classes, image_size):
    factory = load_factory(spec)
    try:
        net = factory(in_channels, num_classes, image_size)
    except Exception as e:
        raise UserError(f"model factory {spec} raised {_reason(e)} (called with in_channels={in_channels}, "
                        f"num_classes={num_classes}, image_size={image_size}); fix the factory")
    if not isinstance(net, nn.Module):
        raise UserError(f"model factory {spec} returned a {type(net).__name__}, not a torch.nn.Module; "
                        f"return the model")
    return net


def _check_output(model, spec, in_channels, num_classes, image_size):
    """One forward of a dummy batch of 2 (eval mode, no state changed): logits of shape (2, num_classes)."""
    x = torch.randn(2, in_channels, image_size, image_size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise UserError(f"model {spec} fails on a batch of 2 images of {in_channels}x{image_size}x{image_size}: "
                        f"{_reason(e)}; pick a model for this image size or fix it")
    finally:
        model.train(was)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise UserError(f"model {spec} returns {shape} for a batch of 2 images, expected logits of shape "
                        f"(2, {num_classes}) (batch, classes); return one logit per class")


# ----------------------------------------------------------------------------- building

def build_model(name, in_channels, num_classes, image_size, width=1.0, seed=0, dropout=None, dropout_after="auto",
                groups=None):
    """A freshly initialized model for a spec (see the module docstring); initialization depends only
    on (spec, shapes, width, seed). `width` applies to the zoo only.

    `dropout=factory` adds parameter-free dropout modules (common.dropout), the weights are the same
    as without them; `dropout_after` says where ("auto": the zoo's built-in places, or
    common.dropout.place's defaults). `groups`: module-name prefixes of the layer groups (checked)."""
    parsed = parse_spec(name)
    if parsed is None:
        raise UserError(_spec_error(name))
    builtin = parsed[0] == "zoo" and dropout_after == "auto"
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(derive_seed(seed, "init"))
        if parsed[0] == "zoo":
            model = _BUILDERS[name](in_channels, num_classes, image_size, width, dropout=dropout if builtin else None)
        else:
            if parsed[0] == "torchvision":
                problem = check_model(name)
                if problem:
                    raise UserError(problem)
                net = _torchvision(parsed[1], in_channels, num_classes, image_size)
            else:
                net = _from_factory(name, in_channels, num_classes, image_size)
            model = External(net, name)
            _check_output(model, name, in_channels, num_classes, image_size)
    if groups is not None:
        model.group_prefixes = list(groups)
    check_groups(model)
    if dropout is not None and not builtin:
        from . import dropout as dropout_module  # lazily: torch hooks machinery only where dropout is placed
        dropout_module.place(model, dropout, dropout_after, (in_channels, image_size, image_size), root(model)[1])
    return model


def model_for(cfg, data, dropout=None):
    """The configured model for a dataset, initialized from cfg.model_seed, on the data's device,
    with the layer groups of cfg.groups (`dropout`: an optional factory, placed as cfg.dropout_after
    says where a script has that knob; see build_model)."""
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size, cfg.width, cfg.model_seed,
                        dropout=dropout, dropout_after=getattr(cfg, "dropout_after", "auto"),
                        groups=getattr(cfg, "groups", None))
    return model.to(data.device, memory_format=torch.channels_last)  # ~1.4x faster convolutions on CPU


# ----------------------------------------------------------------------------- layer groups

PLAIN = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # containers whose children are the computation


def root(model):
    """(state_dict prefix, module) below which layer groups are named: `layers` of a zoo Net, `net`
    of an External model, else the model itself."""
    if isinstance(model, Net):
        return "layers.", model.layers
    if isinstance(model, External):
        return "net.", model.net
    return "", model


def _under(key, prefix):
    return key == prefix or key.startswith(prefix + ".")


def _own_tensors(module):
    """Names of the parameters and (persistent) buffers a module holds itself."""
    return [n for n, _ in module.named_parameters(recurse=False)] + \
        [n for n, _ in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]


def _holds(module):
    return next(iter(module.state_dict()), None) is not None


def _zoo_prefixes(layers):
    def walk(prefix, module):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if getattr(child, "expand_groups", False):
                yield from walk(path + ".", child)
            elif any(True for _ in child.parameters()):
                yield path
    return list(walk("", layers))


def _derived_prefixes(module):
    """The default groups of a non-zoo model (see the module docstring)."""
    prefix = ""
    while True:
        kids = [(n, c) for n, c in module.named_children() if _holds(c)]
        if _own_tensors(module) or len(kids) != 1 or not any(True for _ in kids[0][1].children()):
            break
        prefix, module = f"{prefix}{kids[0][0]}.", kids[0][1]  # a wrapper: look through it
    out = [prefix + n for n in _own_tensors(module)]
    for name, child in kids:
        sub = [n for n, c in child.named_children() if _holds(c)]
        blocks = sum(1 for c in child.children() if any(p.dim() >= 2 for p in c.parameters()))
        expand = getattr(child, "expand_groups", False) or (type(child) in PLAIN and blocks >= 2)
        if expand and not _own_tensors(child):
            out += [f"{prefix}{name}.{n}" for n in sub]
        else:
            out.append(prefix + name)
    return out


def group_prefixes(model):
    """The layer groups' module-name prefixes below the root: `groups` given at build time, else the
    root's layer_groups() method, else derived from the module tree."""
    if getattr(model, "group_prefixes", None):
        return list(model.group_prefixes)
    _, module = root(model)
    if isinstance(model, Net):
        return _zoo_prefixes(module)
    if callable(getattr(module, "layer_groups", None)):
        return list(module.layer_groups())
    return _derived_prefixes(module)


def check_groups(model):
    """UserError unless the groups name existing modules or tensors, do not overlap, and cover every
    parameter and buffer of the model."""
    prefixes = group_prefixes(model)
    source = ("--groups" if getattr(model, "group_prefixes", None) else
              "the model's layer_groups()" if callable(getattr(root(model)[1], "layer_groups", None)) else "layer groups")
    _, module = root(model)
    keys = list(module.state_dict())
    tops = list(dict.fromkeys(k.split(".")[0] for k in keys))
    for p in prefixes:
        if not isinstance(p, str) or not any(_under(k, p) for k in keys):
            raise UserError(f"{source}: no parameter or buffer under {p!r}; give module names of the model "
                            f"(top level: {', '.join(tops[:12])}{', ...' if len(tops) > 12 else ''})")
    for i, a in enumerate(prefixes):
        for b in prefixes[i + 1:]:
            if _under(a, b) or _under(b, a):
                raise UserError(f"{source}: groups {a!r} and {b!r} overlap; every tensor must be in one group")
    for k in keys:
        if not any(_under(k, p) for p in prefixes):
            raise UserError(f"{source}: {k} is in no group; add a prefix that covers it (e.g. {k.split('.')[0]!r})")


class _Tensors(nn.Module):
    """A parameter or buffer that a module holds itself (e.g. a class token), as a group of its own.
    It holds the model's own tensor objects; it is not part of the model."""

    def __init__(self, owner, name):
        super().__init__()
        t = getattr(owner, name)
        if isinstance(t, nn.Parameter):
            self.register_parameter(name, t)
        else:
            self.register_buffer(name, t)


def _group_module(module, prefix):
    try:
        return module.get_submodule(prefix)
    except AttributeError:
        parent, _, leaf = prefix.rpartition(".")
        return _Tensors(module.get_submodule(parent) if parent else module, leaf)


def layer_groups(model):
    """Ordered [(group name, module)], input to output (a group that is a bare tensor comes as a
    parameter-only module holding the model's tensor)."""
    _, module = root(model)
    return [(p, _group_module(module, p)) for p in group_prefixes(model)]


def group_keys(model):
    """Ordered {group name: [state_dict keys]} (parameters and buffers, e.g. BatchNorm statistics)."""
    base, _ = root(model)
    keys = list(model.state_dict())
    return {p: [k for k in keys if _under(k, base + p)] for p in group_prefixes(model)}


def group_params(model):
    """Ordered {group name: [parameters]}."""
    base, _ = root(model)
    named = list(model.named_parameters())
    return {p: [t for n, t in named if _under(n, base + p)] for p in group_prefixes(model)}


def group_of(model):
    """{full parameter or buffer name in model.state_dict(): its layer group}."""
    return {k: g for g, keys in group_keys(model).items() for k in keys}


def stages(model):
    """The model's computation as top-level modules that, run in order, equal model(x) (a zoo model's
    `layers`), or None where the forward is not such a sequence (torchvision and user models): code
    that reuses the output of an unchanged front of the network must then run the whole model."""
    layers = model.layers if isinstance(model, Net) else None
    return list(layers.children()) if isinstance(layers, nn.Sequential) else None
