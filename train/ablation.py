"""The paper's ablation on Fashion-MNIST: full block, no identity, no 1x1, plain (3x3 only).

    python -m train.ablation --model_dir runs/ablation [--epochs 2] [train flags...]

Runs `python -m train` once per variant (same flags otherwise), reads each run's last line
and writes <model_dir>/ablation.md with the training- and deploy-form accuracies.
"""

import os
import re
import subprocess
import sys
import time

from train import staged

VARIANTS = ("full", "no_identity", "no_1x1", "plain")


def run(model_dir, extra_args):
    rows = []
    for variant in VARIANTS:
        run_dir = os.path.join(model_dir, variant)
        command = [
            sys.executable,
            "-m",
            "train",
            "--ablation",
            variant,
            "--model_dir",
            run_dir,
            *extra_args,
        ]
        print(f"== {variant}: {' '.join(command[1:])}", flush=True)
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        minutes = (time.monotonic() - start) / 60
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        match = re.match(r"accuracy: training_form=(\S+) deploy_form=(\S+)", last)
        if result.returncode or not match:
            sys.stderr.write(result.stdout[-2000:] + result.stderr[-2000:])
            raise SystemExit(f"ablation run {variant} failed (exit {result.returncode})")
        rows.append((variant, match.group(1), match.group(2), minutes))
        print(f"   {last} ({minutes:.1f} min)", flush=True)
    table = ["| block | training form top-1 | deploy form top-1 | minutes |", "|---|---|---|---|"]
    table += [f"| {v} | {t} | {d} | {m:.1f} |" for v, t, d, m in rows]
    text = (
        f"Command: python -m train.ablation --model_dir {model_dir} {' '.join(extra_args)}\n\n"
        + "\n".join(table)
        + "\n"
    )
    os.makedirs(model_dir, exist_ok=True)
    staged.write_text(os.path.join(model_dir, "ablation.md"), text)
    print(text)


def main(argv):
    if "--model_dir" not in argv:
        raise SystemExit("usage: python -m train.ablation --model_dir DIR [train flags...]")
    i = argv.index("--model_dir")
    model_dir = argv[i + 1]
    extra = argv[:i] + argv[i + 2 :]
    defaults = ["--dataset", "fashion_mnist", "--image_size", "32", "--verbose", "2"]
    run(model_dir, defaults + extra)


if __name__ == "__main__":
    main(sys.argv[1:])
