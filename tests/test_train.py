"""Training: input pipelines (mock, folder, Fashion-MNIST), recipes, kill-and-resume, both forms agree."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import repvgg_keras as rk
from export import images
from repvgg_keras import preprocessing
from repvgg_keras.structure import all_layers
from tests import helpers
from tests.helpers import REPO, cli_env, free_ports
from train import classification_data, recipes

pytestmark = pytest.mark.slow  # converts, exports, serves or trains end to end

# The shared tiny model at batch 16 (absl: the last value given for a flag wins).
TINY = [*helpers.TINY, "--batch_size", "16"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,test}/<class>/<n>.png from real Fashion-MNIST images (4 classes)."""
    root = tmp_path_factory.mktemp("folder")
    pixels, labels = images.fashion_mnist("t10k")
    keep = np.flatnonzero(labels < 4)
    for split, chosen in (("train", keep[:320]), ("test", keep[320:400])):
        for i in chosen:
            directory = root / split / f"class{labels[i]}"
            directory.mkdir(parents=True, exist_ok=True)
            tf.io.write_file(str(directory / f"{i}.png"), tf.io.encode_png(pixels[i][..., None]))
    return root


def test_mock_tfds_pipeline():
    with tfds.testing.mock_data(num_examples=24):
        train, evaluation, info = classification_data.load(
            "cifar10", image_size=40, batch_size=8, download=True
        )
        x, y = next(iter(train))
        assert x.shape == (8, 40, 40, 3) and y.shape == (8, 10)
        np.testing.assert_allclose(np.sum(y, -1), 1.0)
        assert info.train_examples == 24 and info.eval_split == "test"
        assert sum(int(b[0].shape[0]) for b in evaluation) == 24  # eval keeps every example


def test_folder_pipeline_augments_training_and_not_evaluation(image_folder):
    train, evaluation, info = classification_data.load(
        f"folder:{image_folder}", image_size=32, batch_size=16, seed=1
    )
    assert (info.num_classes, info.train_examples, info.eval_examples) == (4, 320, 80)
    x, _ = next(iter(train))
    assert x.shape == (16, 32, 32, 3)
    assert np.allclose(
        x[..., 0], x[..., 1] * 0.224 / 0.229 + (0.456 - 0.485) / 0.229, atol=1e-4
    )  # gray -> RGB
    first = [b[0].numpy() for b in evaluation]
    second = [b[0].numpy() for b in evaluation]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))  # deterministic evaluation
    crop = classification_data.random_resized_crop(
        tf.reshape(tf.range(64 * 64 * 3), (64, 64, 3)), 32
    )
    assert crop.shape == (32, 32, 3)


def test_fashion_mnist_from_the_debian_package(tmp_path):
    train, evaluation, info = classification_data.load(
        "fashion_mnist", image_size=32, batch_size=500, data_dir=str(tmp_path)
    )
    assert (info.num_classes, info.train_examples, info.eval_examples) == (10, 60000, 10000)
    assert os.path.isdir(tmp_path / "fashion_mnist_debian")
    counts = np.zeros(10, int)
    for x, y in evaluation:
        assert x.shape[1:] == (32, 32, 32 // 32 * 3)
        counts += np.bincount(np.argmax(y, -1), minlength=10)
    _, labels = images.fashion_mnist("t10k")
    np.testing.assert_array_equal(
        counts, np.bincount(labels, minlength=10)
    )  # every test image, once


def test_missing_dataset_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(
        classification_data.DatasetNotFound, match="not prepared.*Nothing was downloaded"
    ):
        classification_data.load("imagenette", image_size=32, batch_size=8, data_dir=str(tmp_path))
    with pytest.raises(classification_data.DatasetNotFound, match="does not exist"):
        classification_data.load(f"folder:{tmp_path}/nope", image_size=32, batch_size=8)
    assert time.monotonic() - start < 30


def test_recipes_are_data_and_overridable():
    paper = recipes.get_recipe("paper120")
    assert (paper.epochs, paper.batch_size, paper.base_lr, paper.momentum, paper.weight_decay) == (
        120,
        256,
        0.1,
        0.9,
        1e-4,
    )
    assert paper.label_smoothing == 0 and recipes.get_recipe("paper200").label_smoothing == 0.1
    assert recipes.get_recipe("paper120", batch_size=1024).scaled_lr(1024) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="Unknown recipe"):
        recipes.get_recipe("paper300")


def test_weight_decay_exclusions_follow_the_authors():
    model = rk.RepVGG_A0(input_shape=(32, 32, 3), classes=3)
    excluded = {v.path for v in recipes.no_decay_variables(model)}
    assert "predictions/bias" in excluded and "predictions/kernel" not in excluded
    assert (
        "stage1_1/stage1_1_dense_bn/gamma" in excluded
        and "stage1_1/stage1_1_1x1_bn/gamma" in excluded
    )
    assert (
        "stage1_1/stage1_1_identity_bn/gamma" not in excluded
    )  # the identity gamma keeps its decay
    assert "stage1_1/stage1_1_identity_bn/beta" in excluded
    assert not any(p.endswith("kernel") for p in excluded)


def _train_cmd(model_dir, dataset, *extra):
    return [
        sys.executable,
        "-m",
        "train",
        "--dataset",
        dataset,
        "--model_dir",
        str(model_dir),
        *TINY,
        *extra,
    ]


def test_kill_and_resume_then_both_forms_agree(tmp_path, image_folder):
    model_dir = tmp_path / "run"
    cmd = _train_cmd(
        model_dir,
        f"folder:{image_folder}",
        "--epochs",
        "2",
        "--steps_per_epoch",
        "40",
        "--checkpoint_every",
        "5",
    )
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    step_file = model_dir / "last_step"
    deadline = time.monotonic() + 300
    killed_at = 0
    while time.monotonic() < deadline and first.poll() is None:
        if step_file.exists() and step_file.read_text().strip():
            killed_at = int(step_file.read_text())
            if killed_at >= 13:
                break
        time.sleep(0.2)
    assert first.poll() is None, "training ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = int(step_file.read_text())
    assert 13 <= killed_at < 80
    second = subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = re.search(
        r"Resuming from the last checkpoint: epoch (\d+), optimizer step (\d+)", second.stdout
    )
    assert resumed, second.stdout[-3000:]
    assert (
        killed_at - 5 <= int(resumed.group(2)) <= killed_at
    )  # lost at most --checkpoint_every steps
    final = re.search(
        r"^accuracy: training_form=(\d\.\d{4}) deploy_form=(\d\.\d{4})$",
        second.stdout.strip().splitlines()[-1],
    )
    assert final, second.stdout[-2000:]
    assert final.group(1) == final.group(2)
    for name in (
        "model_train.keras",
        "model_deploy.keras",
        "training_log.csv",
        "training_curves.png",
    ):
        assert (model_dir / name).exists(), name
    assert os.listdir(model_dir / "logs")
    deploy = __import__("keras").saving.load_model(model_dir / "model_deploy.keras")
    assert rk.is_deploy_form(deploy)


def test_nan_loss_stops_with_a_message(tmp_path, image_folder):
    result = subprocess.run(
        _train_cmd(
            tmp_path / "nan",
            f"folder:{image_folder}",
            "--epochs",
            "1",
            "--steps_per_epoch",
            "20",
            "--base_lr",
            "1e12",
            "--warmup_epochs",
            "0",
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "NaN" in result.stderr and "step" in result.stderr


def test_two_workers_on_loopback_end_with_identical_weights(tmp_path, image_folder):
    import json

    import keras

    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    # EMA and the custom L2 ride along: both go through the hand-written multi-worker loop.
    cmd = _train_cmd(
        model_dir,
        f"folder:{image_folder}",
        "--epochs",
        "1",
        "--steps_per_epoch",
        "6",
        "--ema_momentum",
        "0.9",
        "--custom_l2",
    )
    workers = []
    for index in range(2):
        env = dict(
            cli_env(),
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        workers.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all("2 replica(s)" in out for out in outputs)
    digests = [re.search(r"weights digest: (\S+)", out).group(1) for out in outputs]
    assert digests[0] == digests[1]
    chief = keras.saving.load_model(model_dir / "model_train.keras")
    other = keras.saving.load_model(model_dir / "worker_1" / "model_train.keras")
    bn_stats = [v for v in chief.variables if "moving_" in v.path]
    assert bn_stats and all(float(np.abs(v.numpy()).sum()) > 0 for v in bn_stats)
    for a, b in zip(chief.variables, other.variables):  # weights and synchronised BN statistics
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert any(isinstance(l, rk.RepVGGBlock) and l.bn_synchronized for l in chief.layers)


def test_ablation_script_writes_a_table(tmp_path, image_folder):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.ablation",
            "--model_dir",
            str(tmp_path / "abl"),
            "--dataset",
            f"folder:{image_folder}",
            *TINY,
            "--epochs",
            "1",
            "--steps_per_epoch",
            "3",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    for variant in ("full", "no_identity", "no_1x1", "plain"):
        row = re.search(rf"\| {variant} \| (\d\.\d{{4}}) \| (\d\.\d{{4}}) \|", table)
        assert row and row.group(1) == row.group(2), table
    plain = __import__("keras").saving.load_model(tmp_path / "abl" / "plain" / "model_train.keras")
    blocks = [l for l in plain.layers if isinstance(l, rk.RepVGGBlock)]
    assert blocks and all(b.identity_bn is None and b.pointwise_conv is None for b in blocks)


def test_eval_crop_one_keeps_the_whole_image():
    image = tf.reshape(tf.range(32 * 32 * 3, dtype=tf.float32), (32, 32, 3))
    np.testing.assert_allclose(classification_data.center_crop(image, 32, 1.0), image)
    assert not np.allclose(classification_data.center_crop(image, 32, 0.875), image)
    assert (
        recipes.get_recipe("small").eval_crop == 1.0
        and recipes.get_recipe("paper120").eval_crop == 0.875
    )


def _authors_custom_l2(dense_oihw, pointwise_oihw, dense_bn, pointwise_bn, eps=1e-5):
    """The authors' get_custom_L2, written out in numpy on OIHW kernels (float64)."""
    t3 = (dense_bn[0] / np.sqrt(dense_bn[3] + eps)).reshape(-1, 1, 1, 1)
    t1 = (pointwise_bn[0] / np.sqrt(pointwise_bn[3] + eps)).reshape(-1, 1, 1, 1)
    circle = (dense_oihw**2).sum() - (dense_oihw[:, :, 1:2, 1:2] ** 2).sum()
    eq_kernel = dense_oihw[:, :, 1:2, 1:2] * t3 + pointwise_oihw * t1
    return circle + (eq_kernel**2 / (t3**2 + t1**2)).sum()


def test_custom_l2_matches_the_authors_formula_and_enters_the_fit_loss():
    import keras

    from repvgg_keras.layers import RepVGGBlock
    from repvgg_keras.parity import randomize_batchnorm

    model = randomize_batchnorm(
        rk.get_model("RepVGG_A0", input_shape=(32, 32, 3), classes=4), seed=3
    )
    block = model.get_layer("stage2_1")
    oihw = lambda kernel: np.transpose(np.asarray(kernel, np.float64), (3, 2, 0, 1))
    bn = lambda layer: [np.asarray(w, np.float64) for w in layer.get_weights()]
    expected = _authors_custom_l2(
        oihw(block.dense_conv.kernel),
        oihw(block.pointwise_conv.kernel),
        bn(block.dense_bn),
        bn(block.pointwise_bn),
    )
    assert float(block.equivalent_kernel_l2()) == pytest.approx(expected, rel=1e-5)

    excluded = recipes.use_custom_l2(model, 0.1)
    blocks = [layer for layer in all_layers(model) if isinstance(layer, RepVGGBlock)]
    assert len(excluded) == 2 * len(blocks)  # every 3x3 and 1x1 kernel leaves plain weight decay

    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 1.0  # keep the moving statistics (which the penalty reads) fixed
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(8) % 4, 4)
    losses = {}
    for coefficient in (0.0, 0.1):
        recipes.use_custom_l2(model, coefficient)
        penalty = 0.5 * 0.1 * sum(float(b.equivalent_kernel_l2()) for b in blocks)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.0),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        )
        losses[coefficient] = float(model.train_on_batch(x, y))  # lr 0: weights unchanged
    assert losses[0.1] - losses[0.0] == pytest.approx(penalty, rel=1e-3)


def test_randaugment_alters_training_images_only():
    """paper200's stronger augmentation: with the crop fixed to the whole image, basic training
    gives the image or its mirror; RandAugment changes (nearly) every one; evaluation stays put."""
    pixels, _ = images.fashion_mnist("t10k")
    image = np.repeat(pixels[0][..., None], 3, -1)
    one = tf.data.Dataset.from_tensors((image, 0))
    common = dict(image_size=28, num_classes=10, cache=False, seed=0)
    reference = next(
        iter(
            classification_data.make_pipeline(
                one, batch_size=1, training=False, eval_crop=1.0, **common
            )
        )
    )[0][0].numpy()

    def unchanged(batch):
        return sum(
            min(np.abs(x - reference).max(), np.abs(x - reference[:, ::-1]).max()) < 1e-4
            for x in batch
        )

    for augment, expected in (("basic", lambda n: n == 64), ("randaugment", lambda n: n <= 8)):
        pipeline = classification_data.make_pipeline(
            one.repeat(64), batch_size=64, training=True, min_area=1.0, augment=augment, **common
        )
        batch = next(iter(pipeline))[0].numpy()
        assert expected(unchanged(batch)), (augment, unchanged(batch))
        low, high = (preprocessing.normalize(np.full(3, v, np.float32)) for v in (0.0, 255.0))
        assert np.all(batch >= low - 1e-5) and np.all(
            batch <= high + 1e-5
        )  # stays within 0..255 pixels
    evaluation = classification_data.make_pipeline(
        one, batch_size=1, training=False, eval_crop=1.0, augment="randaugment", **common
    )
    np.testing.assert_array_equal(next(iter(evaluation))[0][0].numpy(), reference)
    assert (
        recipes.get_recipe("paper200").augment == "randaugment"
        and recipes.get_recipe("paper120").augment == "basic"
    )
    with pytest.raises(ValueError, match="Unknown augment"):
        classification_data.make_pipeline(
            one, batch_size=1, training=True, augment="autoaugment", **common
        )


def test_ema_weights_end_up_in_the_model():
    """--ema_momentum: after fit the model holds the moving average of the weights seen after
    each step (first step: the weights themselves), not the last step's weights."""
    import keras

    keras.utils.set_random_seed(0)
    model = _tiny_model()
    recipe = recipes.get_recipe("small", ema_momentum=0.5, batch_size=8, warmup_epochs=0.0)
    model.compile(
        optimizer=recipes.make_optimizer(recipe, model, total_steps=4, warmup_steps=0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            [v.numpy().copy() for v in model.trainable_variables]
        )
    )
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(32) % 3]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[record], shuffle=False)
    assert len(seen) == 4
    average = seen[0]
    for step in seen[1:]:
        average = [0.5 * a + 0.5 * w for a, w in zip(average, step)]
    final = [v.numpy() for v in model.trainable_variables]
    for got, want in zip(final, average):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (
        max(np.abs(g - l).max() for g, l in zip(final, seen[-1])) > 1e-4
    )  # not just the last weights


def _tiny_model(classes=3):
    import dataclasses

    spec = dataclasses.replace(
        rk.get_spec("RepVGG_A0"), num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25)
    )
    return rk.RepVGG(spec, input_shape=(32, 32, 3), classes=classes)


def test_mixed_bfloat16_trains_and_both_forms_agree(tmp_path, image_folder):
    """--mixed_precision mixed_bfloat16 (what `auto` picks on AMX CPUs): blocks compute in bf16,
    the classifier in float32, and the fused deploy model classifies like the training form."""
    import keras

    model_dir = tmp_path / "bf16"
    result = subprocess.run(
        _train_cmd(
            model_dir,
            f"folder:{image_folder}",
            "--epochs",
            "1",
            "--steps_per_epoch",
            "8",
            "--mixed_precision",
            "mixed_bfloat16",
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "precision mixed_bfloat16" in result.stdout
    final = re.search(r"accuracy: training_form=(\S+) deploy_form=(\S+)$", result.stdout.strip())
    # Both forms compute in bf16 here, so near-ties of a one-epoch model may flip: a few of 80 images.
    flipped = round(abs(float(final.group(1)) - float(final.group(2))) * 80) if final else None
    assert flipped is not None and flipped <= 3, result.stdout[-500:]
    for name in ("model_train.keras", "model_deploy.keras"):
        model = keras.saving.load_model(model_dir / name)
        convs = [l for l in model.layers if isinstance(l, (rk.RepVGGBlock, keras.layers.Conv2D))]
        assert convs and all(l.dtype_policy.name == "mixed_bfloat16" for l in convs), name
        assert model.get_layer("predictions").compute_dtype == "float32"
        assert model.output.dtype == "float32"


def test_quant_friendly_trains_through_the_cli(tmp_path, image_folder):
    """--quant_friendly builds QARepVGG blocks, trains, and fuses into the plain model exactly."""
    import keras

    model_dir = tmp_path / "qa"
    result = subprocess.run(
        _train_cmd(
            model_dir,
            f"folder:{image_folder}",
            "--epochs",
            "1",
            "--steps_per_epoch",
            "6",
            "--quant_friendly",
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "(full, quant_friendly)" in result.stdout
    final = re.search(r"accuracy: training_form=(\S+) deploy_form=(\S+)$", result.stdout.strip())
    assert final and final.group(1) == final.group(2), result.stdout[-500:]
    model = keras.saving.load_model(model_dir / "model_train.keras")
    assert all(l.quant_friendly for l in model.layers if isinstance(l, rk.RepVGGBlock))


def _random_tiny_model(classes, width=0.25):
    spec = rk.RepVGGSpec(name="tiny", num_blocks=(1, 1, 1, 1), width_multipliers=(width, width))
    model = rk.RepVGG(spec, input_shape=(32, 32, 3), classes=classes)
    rng = np.random.default_rng(classes)
    model.set_weights(
        [rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in model.get_weights()]
    )
    return model


def test_init_weights_copies_every_block_and_refreshes_a_new_classifier():
    from train import pretrained

    donor, model = _random_tiny_model(classes=7), _random_tiny_model(classes=4)
    head_before = model.get_layer("predictions").get_weights()
    assert pretrained.copy_weights(model, donor) == ["predictions"]
    for layer in model.layers:
        if isinstance(layer, rk.RepVGGBlock):
            for mine, theirs in zip(layer.get_weights(), donor.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(mine, theirs)
    for mine, before in zip(model.get_layer("predictions").get_weights(), head_before):
        np.testing.assert_array_equal(mine, before)
    same_classes = _random_tiny_model(classes=7)
    assert pretrained.copy_weights(same_classes, donor) == []
    np.testing.assert_array_equal(
        same_classes.predict(np.ones((1, 32, 32, 3)), verbose=0),
        donor.predict(np.ones((1, 32, 32, 3)), verbose=0),
    )


def test_init_weights_refuses_another_variant():
    from train import pretrained

    with pytest.raises(ValueError, match=r"stage0: source weights .*\n(.|\n)*same variant"):
        pretrained.copy_weights(
            _random_tiny_model(classes=4), _random_tiny_model(classes=4, width=0.5)
        )
    with pytest.raises(ValueError, match="no architecture"):
        pretrained.load_donor("x.weights.h5", build=None)


def test_fine_tune_through_the_cli_starts_from_the_given_model(tmp_path, image_folder):
    """--init_weights with a saved model: at learning rate 0 the kernels stay exactly the donor's."""
    import keras

    donor = rk.RepVGG(
        rk.RepVGGSpec(
            name="RepVGG_A0_custom", num_blocks=(1, 1, 1, 1), width_multipliers=(0.25, 0.25)
        ),
        input_shape=(32, 32, 3),
        classes=9,
    )
    donor.set_weights(
        [
            np.random.default_rng(0).uniform(0.5, 1.5, w.shape).astype("float32")
            for w in donor.get_weights()
        ]
    )
    donor.save(tmp_path / "donor.keras")
    model_dir = tmp_path / "ft"
    result = subprocess.run(
        _train_cmd(
            model_dir,
            f"folder:{image_folder}",
            "--epochs",
            "1",
            "--steps_per_epoch",
            "2",
            "--base_lr",
            "0",
            "--init_weights",
            str(tmp_path / "donor.keras"),
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all weights but predictions (new classes: fresh init)" in result.stdout
    tuned = keras.saving.load_model(model_dir / "model_train.keras")
    assert tuned.output_shape[-1] == 4
    for layer in tuned.layers:
        if isinstance(layer, rk.RepVGGBlock):
            np.testing.assert_array_equal(
                np.asarray(layer.dense_conv.kernel),
                np.asarray(donor.get_layer(layer.name).dense_conv.kernel),
            )

    missing = subprocess.run(
        _train_cmd(
            tmp_path / "bad",
            f"folder:{image_folder}",
            "--epochs",
            "1",
            "--steps_per_epoch",
            "1",
            "--init_weights",
            str(tmp_path / "nope.keras"),
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert missing.returncode == 1 and "nope.keras' does not exist" in missing.stderr


STEM_TRAINING = """
import numpy as np, keras, tensorflow as tf
from repvgg_keras import RepVGGBlock
block = RepVGGBlock(48, strides=2, name="stage0")
x = tf.constant(np.random.default_rng(0).random((32, 224, 224, 3), dtype=np.float32))
block(x)
@tf.function
def step():
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(block(x, training=True)))
    return tape.gradient(loss, block.trainable_weights)
for _ in range(40):
    grads = step()
print("finite", all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads))
"""


def test_stem_trains_at_224_without_crashing():
    """TF 2.21's oneDNN stride-2 1x1 backward-weights kernel corrupted the heap on a 224px RGB input
    (segfault in 3 of 3 runs of 40 steps): the block must not route its 1x1 branch through it."""
    result = subprocess.run(
        [sys.executable, "-c", STEM_TRAINING],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stderr[-1500:]}"
    assert "finite True" in result.stdout


@pytest.mark.parametrize("classes,fresh", [(10, []), (4, ["predictions"])])
def test_init_weights_from_a_timm_checkpoint(classes, fresh):
    """The torch-free golden fixture (timm training form, 10 classes): with 10 classes the fine-tuning
    start is timm's model exactly; with 4, every block is and the classifier stays fresh."""
    import keras
    from test_checkpoints import FIXTURES, GOLDEN_SPEC

    from repvgg_keras.parity import max_relative_difference
    from train import pretrained

    model = rk.RepVGG(GOLDEN_SPEC, input_shape=(None, None, 3), classes=classes)
    build = lambda include_top: rk.RepVGG(
        GOLDEN_SPEC,
        input_shape=(None, None, 3),
        include_top=include_top,
        classes=classes if include_top else None,
    )
    donor = pretrained.load_donor(os.path.join(FIXTURES, "golden_tiny.safetensors"), build)
    assert pretrained.copy_weights(model, donor) == fresh
    golden = np.load(os.path.join(FIXTURES, "golden_tiny.npz"))
    if classes == 10:
        assert max_relative_difference(np.asarray(model(golden["images"])), golden["logits"]) < 1e-4
    features = lambda m: np.asarray(
        keras.Model(m.inputs, m.get_layer("stage4_0").output)(golden["images"])
    )
    np.testing.assert_array_equal(features(model), features(donor))


def test_progress_lines_report_step_metrics_and_time_left(capsys):
    """--verbose 2 runs print a line every --progress_every seconds inside an epoch (fake clock: 10 s a step)."""
    import itertools

    import keras

    from train.callbacks import ProgressLines

    ticks = itertools.count(0, 10)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", metrics=["accuracy"])
    x, y = np.ones((48, 4), "float32"), np.zeros((48, 2), "float32")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=1,
        verbose=0,
        callbacks=[ProgressLines(25, clock=lambda: next(ticks))],
    )
    lines = capsys.readouterr().out.strip().splitlines()
    # epoch begins at t=0; steps end at 10, 20, ...: a line at 30 s (step 3) and 60 s (step 6)
    assert [line.split(",")[0] for line in lines] == ["epoch 1/1 step 3/6", "epoch 1/1 step 6/6"], (
        lines
    )
    assert (
        "loss " in lines[0]
        and "accuracy " in lines[0]
        and "10.00 s/step, epoch ends in 0.5 min" in lines[0]
    ), lines
