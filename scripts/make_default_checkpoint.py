"""Write the bundled default checkpoint used by the README's first run.

`models/checkpoints/resnet_digits.safetensors` is the state dict of `models.zoo.build("resnet_digits")`:
random weights with deterministic, non-trivial BatchNorm statistics (an untrained placeholder until a model
trained on real data replaces it). Run from the repository root: python scripts/make_default_checkpoint.py
"""

from pathlib import Path

from safetensors.torch import save_file

from models import zoo

OUT = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "resnet_digits.safetensors"

if __name__ == "__main__":
    model = zoo.build("resnet_digits", seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")
