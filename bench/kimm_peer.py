"""kimm's RepVGG (the Keras 3 model zoo) with our weights: the Keras peer beside timm.

kimm names its branches after timm (`conv_kxk_0` the 3x3, `conv_scale` the 1x1, `skip` the
identity BatchNorm) and its blocks `stem`, `stages_<s-1>_<i>`; ours are `dense`, `1x1`,
`identity` in `stage0`, `stage<s>_<i>`. The weights are copied branch by branch, and the
benchmark's agreement column checks that both compute the same function.
"""

import re

KIMM_CLASSES = {
    "RepVGG_A0": "RepVGGA0",
    "RepVGG_A1": "RepVGGA1",
    "RepVGG_A2": "RepVGGA2",
    "RepVGG_B0": "RepVGGB0",
    "RepVGG_B1": "RepVGGB1",
    "RepVGG_B2": "RepVGGB2",
    "RepVGG_B3": "RepVGGB3",
}
OUR_BRANCHES = {"dense": "kxk", "1x1": "scale", "identity": "skip"}


def _our_key(path):
    """('stage1_0', 'kxk') for stage1_0/stage1_0_dense_bn/gamma; ('classifier', '') for the head."""
    block, layer = path.split("/")[:2]
    if block == "predictions":
        return "classifier", ""
    for ours, theirs in OUR_BRANCHES.items():
        if layer.startswith(f"{block}_{ours}"):
            return block, theirs
    raise KeyError(f"unexpected weight {path}")


def _kimm_key(path):
    parts = path.split("/")
    if parts[0] == "classifier":
        return "classifier", ""
    block = (
        "stage0"
        if parts[0] == "stem"
        else re.sub(r"stages_(\d+)_(\d+)", lambda m: f"stage{int(m[1]) + 1}_{m[2]}", parts[0])
    )
    branch = re.search(r"_(kxk|scale|skip)", parts[1])[1]
    return block, branch


def _grouped(weights, key):
    groups = {}
    for variable in weights:
        groups.setdefault(key(variable.path), []).append(variable)
    return groups


def build(keras_train, name, reparameterized):
    """kimm's model for variant `name` holding `keras_train`'s weights, in training or reparameterized form."""
    import kimm

    if name not in KIMM_CLASSES:
        raise KeyError(f"kimm has no {name} (it ships {', '.join(KIMM_CLASSES)})")
    _, height, width, channels = keras_train.input_shape
    classes = keras_train.output_shape[-1]
    model = getattr(kimm.models, KIMM_CLASSES[name])(
        weights=None,
        input_shape=(height, width, channels),
        classes=classes,
        classifier_activation=None,
    )
    ours, theirs = _grouped(keras_train.weights, _our_key), _grouped(model.weights, _kimm_key)
    if ours.keys() != theirs.keys():
        raise ValueError(f"kimm's {name} has other branches: {sorted(set(ours) ^ set(theirs))[:4]}")
    for key, variables in ours.items():
        for source, target in zip(variables, theirs[key], strict=True):
            target.assign(source.numpy().reshape(target.shape))
    if reparameterized:
        from kimm.utils import get_reparameterized_model

        model = get_reparameterized_model(model)
    return model
