"""How well each int8 path keeps a trained model's top-1: agreement with fp32 and accuracy.

    python -m bench.int8_agreement --model_file runs/fm_a0/model_deploy.keras [--count 2000] [--calibration 64]

Fashion-MNIST only (the labels come with it): checks on the first --count test images,
calibrates on the first --calibration training images. Accuracy, not speed: safe to run
beside other work.
"""

import sys
import tempfile

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model_file", None, "A trained .keras model (training or deploy form) with 10 classes.")
flags.DEFINE_integer("count", 2000, "Test images to check on.")
flags.DEFINE_integer("calibration", 64, "Training images to calibrate on.")
flags.mark_flag_as_required("model_file")


def variants(deploy, calibration, workdir):
    """(name, function on NHWC batches) for every int8 path we ship, plus the all-ops ONNX one."""
    from export import onnx_int8, runners, tflite

    nchw = lambda x: np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    for quantize in ("int8", "int8_full"):
        run = runners.tflite(tflite.convert(deploy, quantize, calibration))
        yield f"TFLite --quantize {quantize}", run
    source = runners.onnx_file(deploy, workdir, nchw=True)
    for label, ops in (("Conv + Relu (default)", onnx_int8.QUANTIZED_OPS), ("every op", None)):
        target = f"{workdir}/int8_{'conv' if ops else 'all'}.onnx"
        onnx_int8.quantize(source, target, nchw(calibration), op_types=ops)
        run = runners.onnxruntime(target)
        yield f"onnxruntime QDQ, {label}", lambda x, run=run: run(nchw(x))


def main(argv):
    del argv
    import keras

    import repvgg_keras as rk
    from export import images
    from repvgg_keras import preprocessing

    model = keras.saving.load_model(FLAGS.model_file)
    deploy = model if rk.is_deploy_form(model) else rk.to_deploy(model)
    size = deploy.input_shape[1]
    prepare = lambda pixels: preprocessing.normalize(images._resize(pixels, size, size, 3).astype(np.float32))
    train_pixels, _ = images.fashion_mnist("train")
    test_pixels, labels = images.fashion_mnist("t10k")
    calibration, check, labels = (prepare(train_pixels[:FLAGS.calibration]), prepare(test_pixels[:FLAGS.count]),
                                  labels[:FLAGS.count])
    reference = np.asarray(deploy.predict(check, verbose=0))
    print(f"| int8 path | top-1 agreement with fp32 | accuracy |\n|---|---|---|\n"
          f"| fp32 (Keras) | 1.0000 | {np.mean(reference.argmax(-1) == labels):.4f} |", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for name, run in variants(deploy, calibration, workdir):
            got = run(check)
            print(f"| {name} | {np.mean(got.argmax(-1) == reference.argmax(-1)):.4f} | "
                  f"{np.mean(got.argmax(-1) == labels):.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
